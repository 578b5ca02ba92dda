"""Record one ``benchmarks/device_check.sh`` run: copy its JSON into ``benchmarks/results/`` under
names that carry the date, the card and the commit, and print the ``benchmarks/RESULTS.md``
section for it (card, date, versions, commit, the step summary, the benchmark table and goals,
the precision × conv-algorithm table, the Triton block-size sweep).

    python -m benchmarks.record_run OUT_DIR [--commit SHA] [--write] [--results-dir DIR]

``OUT_DIR`` holds what the device run returned (``summary.txt``, ``bench.json``, ``bench.md``,
``precision.json``, ``tune.json``; missing ones are reported as missing). The commit is, in this
order: ``--commit``, the one recorded in ``bench.json`` (``NNS_COMMIT`` on the device machine,
which has no git checkout), else this checkout's ``HEAD`` (with a note). Without ``--write``
nothing is copied (dry run); the section is printed either way, to be pasted into RESULTS.md
under "GPU runs".
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path: str) -> Optional[Dict[str, Any]]:
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    for card in ("h200", "h100", "a100", "l40s"):
        if card in s:
            return card
    return s or "unknown"


def _head() -> str:
    try:
        c = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return c.stdout.strip() if c.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def tune_table(doc: Dict[str, Any]) -> str:
    lines = [f"Layer: {doc.get('layer')}, batch {doc.get('batch')}; useful GFLOP per run "
             f"{doc.get('useful_flops', 0) / 1e9:,.1f}", "",
             "| precision | algorithm | (BM, BN, BK, warps, stages) | ms | TFLOP/s | × gather | max rel. diff vs fp32 gather |",
             "|---|---|---|---|---|---|---|"]
    for r in doc.get("rows", []):
        cfg = "–" if "config" not in r else "(" + ", ".join(map(str, r["config"])) + ")"
        if r.get("error"):
            lines.append(f"| {r['precision']} | {r['algorithm']} | {cfg} | error: {r['error'][:60]} | | | |")
            continue
        diff = r.get("max_rel_diff_vs_fp32_gather")
        lines.append(f"| {r['precision']} | {r['algorithm']} | {cfg} | {r['s'] * 1e3:.3g} | {r['gflops'] / 1e3:.3g} | "
                     f"{'–' if r.get('vs_gather') is None else format(r['vs_gather'], '.2f')} | "
                     f"{'–' if diff is None else format(diff, '.1e')} |")
    return "\n".join(lines)


def section(out_dir: str, commit: str, commit_note: str, names: Dict[str, str]) -> str:
    from . import bench_precision
    from . import run as bench_run

    bench = _load(os.path.join(out_dir, "bench.json"))
    env = (bench or {}).get("env", {})
    gpu = (env.get("gpu") or {}).get("name") or "no GPU recorded"
    date = (env.get("date") or "unknown date")[:10]
    lines = [f"### {date} — {gpu} (one card), torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
             f"commit `{commit[:12]}` — `device_check.sh`", ""]
    if commit_note:
        lines += [commit_note, ""]
    lines += ["Files: " + ", ".join(f"`benchmarks/results/{n}`" for n in names.values()) if names else
              "Files: none copied (dry run)", ""]
    summary = os.path.join(out_dir, "summary.txt")
    if os.path.exists(summary):
        with open(summary) as fh:
            lines += ["```", fh.read().rstrip(), "```", ""]
    else:
        lines += ["(no summary.txt)", ""]
    if bench:
        md = bench_run.render_markdown(bench).splitlines()
        lines += [ln.replace("### Goals", "#### Goals") for ln in md[2:]] + [""]  # without its "## ..." title
    else:
        lines += ["(no bench.json: the suite did not run; see logs.tar.gz / bench.log)", ""]
    prec = _load(os.path.join(out_dir, "precision.json"))
    lines += ["#### Precision × conv algorithm (VGG-16 @32, `benchmarks/bench_precision.py`)", ""]
    lines += [bench_precision.table(prec["rows"]) if prec and prec.get("rows") else "(no precision.json)", ""]
    tune = _load(os.path.join(out_dir, "tune.json"))
    lines += ["#### Triton implicit-gather block sizes (`benchmarks/tune_implicit.py`)", ""]
    lines += [tune_table(tune) if tune else "(no tune.json)", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.record_run", description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--commit", default=None)
    p.add_argument("--write", action="store_true", help="copy the JSON files into the results folder")
    p.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    a = p.parse_args(argv)
    if not os.path.isdir(a.out_dir):
        print(f"record_run: {a.out_dir} is not a folder", file=sys.stderr)
        return 2
    bench = _load(os.path.join(a.out_dir, "bench.json")) or {}
    env = bench.get("env", {})
    note = ""
    commit = a.commit or env.get("commit")
    if not commit or commit.startswith("unknown"):
        commit = _head()
        note = (f"(The device machine recorded no commit; `{commit[:12]}` is this checkout's HEAD when the run "
                "was recorded — pass --commit, or run device_check.sh with NNS_COMMIT set.)")
    date = (env.get("date") or "unknown")[:10]
    card = _slug((env.get("gpu") or {}).get("name") or env.get("device") or "unknown")
    base = f"{date}_{card}_{commit.replace('+dirty', '')[:7]}"
    names: Dict[str, str] = {}
    for src, suffix in (("bench.json", ""), ("precision.json", "_precision"), ("tune.json", "_tune")):
        if os.path.exists(os.path.join(a.out_dir, src)):
            names[src] = f"{base}{suffix}.json"
    if a.write:
        os.makedirs(a.results_dir, exist_ok=True)
        for src, dst in names.items():
            shutil.copyfile(os.path.join(a.out_dir, src), os.path.join(a.results_dir, dst))
    print(section(a.out_dir, commit, note, names if a.write else {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
