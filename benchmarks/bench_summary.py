"""The short summary that ``benchmarks/device_check.sh`` prints last (standard library only, so
it works even when the build or torch is broken).

    python3 -m benchmarks.bench_summary OUT_DIR --build-seconds S --build-rc R [--tests-rc R]
                                        [--bench-rc R] [--wall-seconds S]

Reads ``OUT_DIR/tests.xml`` (JUnit), ``sanitizer.log``, ``bench.json`` and prints: build time
and status, tests passed / failed / skipped (and the failing test names), sanitizer error
counts, and the benchmark headline rows (s/image, speed-ups, time over floor, correctness).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional


def _tests(path: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        return {"status": "no tests.xml"}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"status": f"unreadable tests.xml ({e})"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    tot["failed_names"] = failed
    return tot


def _sanitizer(path: str) -> List[str]:
    if not os.path.exists(path):
        return ["no sanitizer.log"]
    text = open(path, errors="replace").read()
    out = []
    for tool in ("memcheck", "racecheck"):
        sec = text.split(f"== compute-sanitizer --tool {tool}", 1)
        if len(sec) < 2:
            out.append(f"{tool}: not run")
            continue
        body = sec[1].split("== compute-sanitizer --tool", 1)[0]
        rc = re.search(rf"== {tool} rc=(\d+)", body)
        err = re.search(r"ERROR SUMMARY: (\d+) error", body)
        haz = re.search(r"RACECHECK SUMMARY: (\d+) hazard", body)
        scan = re.search(r"sanitize_scan: (.*)", body)
        parts = [f"rc={rc.group(1) if rc else '?'}"]
        if err:
            parts.append(f"{err.group(1)} errors")
        if haz:
            parts.append(f"{haz.group(1)} hazards")
        if scan:
            parts.append(scan.group(1)[:100])
        if rc and rc.group(1) == "124":
            parts.append("TIMED OUT")
        out.append(f"{tool}: " + ", ".join(parts))
    return out


def _f(v: Optional[float], kind: str) -> str:
    if v is None or isinstance(v, str):
        return "–" if v is None else v
    if kind == "s":
        return f"{v:.3g} s" if v >= 1e-3 else f"{v * 1e6:.3g} µs"
    if kind == "x":
        return f"{v:.3g}×" if v < 100 else f"{v:,.0f}×"
    return f"{v:.2g}"


def method_label(r: Dict[str, Any]) -> str:
    """The method as the tables show it: an engine row that records a requested conv algorithm
    names it, ``cuda (gather)``, or for ``auto`` what it chose, ``cuda (auto→gemm)``
    (``cuda (auto)`` when nothing ran); other rows (and JSON of older runs): the method.
    Defined here, torch-free, and re-exported by ``benchmarks.common``."""
    m = str(r.get("method", "?"))
    req = r.get("requested_algorithm")
    if not req:
        return m
    ran = r.get("conv_algorithm")
    return f"{m} ({req}→{ran})" if ran and ran != req else f"{m} ({req})"


def _bench(path: str) -> List[str]:
    if not os.path.exists(path):
        return ["no bench.json"]
    try:
        doc = json.load(open(path))
    except (OSError, ValueError) as e:
        return [f"unreadable bench.json ({e})"]
    env = doc.get("env", {})
    gpu = (env.get("gpu") or {}).get("name")
    pk = doc.get("peaks") or {}
    lines = [f"device {env.get('device')} {gpu or ''}; torch {env.get('torch')}; commit {env.get('commit')}; "
             f"wall {doc.get('wall_s', 0):.0f} s",
             "peaks: " + ", ".join(f"{k.replace('_flops', '')} {v / 1e12:.3g} TFLOP/s" for k, v in pk.items()
                                   if k.endswith("_flops") and isinstance(v, (int, float)))
             + (f", copy {pk['copy_bytes_per_s'] / 1e12:.3g} TB/s" if pk.get("copy_bytes_per_s") else "")]
    rows = doc.get("rows", [])
    hdr = f"{'workload':22s} {'method':18s} {'prec':5s} {'s/image':>11s} {'vs dense':>9s} {'vs captum':>10s} " \
          f"{'time/floor':>10s} {'rel.err':>8s} ok"
    lines.append(hdr)
    for r in rows:
        if r.get("error"):
            lines.append(f"{r.get('workload', '?'):22s} {method_label(r):18s} {r.get('precision', '?'):5s} "
                         f"{str(r['error'])[:70]}")
            continue
        ok = "–" if r.get("verified") is None else ("yes" if r["verified"] else "NO")
        lines.append(f"{r['workload']:22s} {method_label(r):18s} {r['precision']:5s} {_f(r.get('s_per_image'), 's'):>11s} "
                     f"{_f(r.get('speedup_vs_dense'), 'x'):>9s} {_f(r.get('speedup_vs_captum'), 'x'):>10s} "
                     f"{_f(r.get('time_over_floor'), 'x'):>10s} {_f(r.get('rel_err'), 'e'):>8s} {ok}")
    goals = doc.get("goals") or []
    if goals:
        lines.append("goals (measured, not asserted):")
        for g in goals:
            m = g.get("measured")
            ms = _f(m, "x") if isinstance(m, (int, float)) else str(m)
            met = "–" if g.get("met") is None else ("met" if g["met"] else "NOT met")
            lines.append(f"  {g['goal']}: {ms} (target {g['target']}) {met}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--build-seconds", type=float, default=None)
    p.add_argument("--build-rc", type=int, default=None)
    p.add_argument("--tests-rc", type=int, default=None)
    p.add_argument("--bench-rc", type=int, default=None)
    p.add_argument("--wall-seconds", type=float, default=None)
    a = p.parse_args(argv)
    d = a.out_dir
    print("=" * 30 + " device_check summary " + "=" * 30)
    ext = ""
    bl = os.path.join(d, "build.log")
    if os.path.exists(bl):
        m = re.findall(r"ext_info (.*)", open(bl, errors="replace").read())
        ext = m[-1] if m else ""
    print(f"build: rc={a.build_rc} in {a.build_seconds:.0f} s; {ext}" if a.build_seconds is not None
          else f"build: rc={a.build_rc}")
    t = _tests(os.path.join(d, "tests.xml"))
    if "tests" in t:
        print(f"tests: {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped "
              f"(pytest rc={a.tests_rc})")
        for n in t["failed_names"][:15]:
            print(f"  FAILED {n}")
    else:
        print(f"tests: {t['status']} (pytest rc={a.tests_rc})")
    for line in _sanitizer(os.path.join(d, "sanitizer.log")):
        print(f"sanitizer {line}")
    print(f"benchmarks (rc={a.bench_rc}):")
    for line in _bench(os.path.join(d, "bench.json")):
        print(f"  {line}")
    if a.wall_seconds is not None:
        print(f"total wall time {a.wall_seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
