"""``nns reproduce``: the declared, multi-seed reproduction of the thesis's seven findings.

The protocol is declared in ``protocol.json`` beside this module and explained in
docs/reproduction.md: the thesis's small models (the simple CNN 32-64-64 and LeNet-5) trained
on the embedded cluttered digits at full size until the validation loss rises, the
well-trained (best validation accuracy) and over-fitted (last) checkpoints, the seven
findings measured on held-out samples by the chapter modules, five seeds, and the verdict
rule of :mod:`nns_cuda.analysis.thesis.verdict`. :func:`reproduce` runs it and returns a
JSON-safe dict (written to ``docs/results/reproduction.json`` by ``nns reproduce``);
:func:`readme_block` renders the README's tables from that JSON (:func:`readme_table`: the
verdicts; :func:`chapter6_table`: the anomaly criteria per checkpoint) and
:func:`update_readme` writes them between the README's markers::

    python -m nns_cuda.analysis.thesis.reproduce --write-readme README.md

>>> from nns_cuda.analysis.thesis.reproduce import reproduce
>>> out = reproduce(quick=True)                                     # doctest: +SKIP
>>> [(f["id"], f["verdict"]) for f in out["findings"]]              # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from nns_cuda.analysis.thesis import EFFECTS, FINDINGS, finding_values, format_number
from nns_cuda.analysis.thesis._reproduce_run import STAGES, run_model_seed
from nns_cuda.analysis.thesis._reproduce_tables import (
    README_BEGIN,
    README_END,
    chapter6_table,
    readme_block,
    readme_section,
    readme_table,
    update_readme,
)
from nns_cuda.analysis.thesis.verdict import MIN_FRACTION, VERDICTS, combine, direction, judge_seeds

__all__ = ["PROTOCOL_FILE", "DEFAULT_OUT", "QUICK_OUT", "load_protocol", "reproduce", "aggregate",
           "load_reproduction", "readme_table", "chapter6_table", "readme_block", "readme_section", "update_readme",
           "README_BEGIN", "README_END", "write_json", "main"]

#: The committed protocol.
PROTOCOL_FILE = Path(__file__).with_name("protocol.json")
#: Where ``nns reproduce`` writes the full run (relative to the working folder).
DEFAULT_OUT = os.path.join("docs", "results", "reproduction.json")
#: The protocol's explanation (declared with ``protocol.json`` before the full run).
DECLARATION_FILE = Path(__file__).resolve().parents[3] / "docs" / "reproduction.md"
#: Where ``nns reproduce --quick`` writes (never over the full run's file).
QUICK_OUT = os.path.join("nns_output", "reproduction_quick.json")
FORMAT = "nns_cuda.reproduction/1"

#: Relative cost of each stage per model (seconds of one seed of the full protocol, measured
#: on a shared 2-core machine, load average 2–3), for the progress bar's ETA; unknown models
#: use the first entry.
_WEIGHTS = {"cnn_32_64_64": {"data": 2, "train": 33, "chapter4": 41, "chapter5": 37, "chapter6": 119},
            "lenet5": {"data": 1, "train": 10, "chapter4": 23, "chapter5": 29, "chapter6": 51}}

#: The thesis's value of each finding's first effect where it prints one (model key -> text).
_THESIS_EFFECT = {
    "fm_li_depth": "ρ = −1.00 (AlexNet, VGG-16: C^l falls at every layer)",
    "fq_pearson": "most conv layers (share > 0.5)",
    "diversity_masking": "VGG-16 +95.2 % vs −0.01 %; AlexNet +108.3 % vs −12.8 %",
    "avou_tm_spearman": "ρ = 0.97–1.00",
    "hh_vs_ll": "VGG-16: H-H − L-L = 17.4, 21.6, 26.0 pp (phases 1–3)",
}


# --------------------------------------------------------------------------------------------
# the protocol
# --------------------------------------------------------------------------------------------
def _merge(base: Dict[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def load_protocol(config: Union[None, str, "os.PathLike[str]", Mapping[str, Any]] = None, *,
                  quick: bool = False) -> Dict[str, Any]:
    """The protocol as a dict, with the ``quick`` overrides applied when asked.

    Parameters
    ----------
    config : path, mapping or None
        A protocol JSON file, a protocol dict, or None for the committed :data:`PROTOCOL_FILE`.
    quick : bool
        Apply the protocol's ``quick`` section (one seed, small sizes).

    Returns
    -------
    dict
        The protocol without its ``quick`` section; ``quick`` (bool) says which one it is.

    Raises
    ------
    ValueError
        For a protocol without ``seeds``, ``models``, ``data``, ``training``, ``analyses`` or
        ``verdict``.
    """
    if config is None or isinstance(config, (str, os.PathLike)):
        cfg = json.loads(Path(config or PROTOCOL_FILE).read_text(encoding="utf-8"))
    else:
        cfg = copy.deepcopy(dict(config))
    missing = [k for k in ("seeds", "models", "data", "training", "analyses", "verdict") if k not in cfg]
    if missing:
        raise ValueError(f"reproduce: the protocol lacks {', '.join(missing)}; start from {PROTOCOL_FILE}")
    q = cfg.pop("quick", {})
    if quick:
        _merge(cfg, q)
    cfg["quick"] = bool(quick)
    return cfg


def _seed_list(cfg: Mapping[str, Any], seeds: Union[None, int, Sequence[int]]) -> List[int]:
    base = [int(s) for s in cfg["seeds"]]
    if seeds is None:
        return base
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"reproduce: seeds must be at least 1, got {seeds}")
        extra = range(max(base) + 1, max(base) + 1 + max(0, seeds - len(base)))
        return (base + list(extra))[:seeds]
    return [int(s) for s in seeds]


# --------------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------------
def _git(*args: str) -> Optional[str]:
    root = Path(__file__).resolve().parents[3]
    try:
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _provenance() -> Dict[str, Any]:
    import numpy
    import sklearn
    import torch

    from nns_cuda._extension import ext_info

    try:
        from importlib.metadata import version

        nns_version: Optional[str] = version("nns_cuda")
    except Exception:
        nns_version = None
    status = _git("status", "--porcelain")
    return {
        "machine": {"node": platform.node(), "platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "commit": _git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
                     "scikit-learn": sklearn.__version__, "nns_cuda": nns_version,
                     "extension": ext_info().get("loaded")},
    }


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------
def _thesis_for(fid: str, thesis_key: Optional[str]) -> str:
    if fid in _THESIS_EFFECT:
        return _THESIS_EFFECT[fid]
    from nns_cuda.analysis.thesis.chapter6 import THESIS_TABLES

    if fid == "anomaly_overfit":
        t = THESIS_TABLES["table_6_2_anomaly_counts"].get(thesis_key or "", {})
        parts = [f"{ds}: {v[0]} → {v[1]} (+{v[1] - v[0]})" for ds, v in t.items() if v]
    else:
        t = THESIS_TABLES["table_6_5_val_change_pct"].get(thesis_key or "", {})
        parts = [f"{ds}: {v[0]:+.2f} vs {v[1]:+.2f} ({v[0] - v[1]:+.2f})" for ds, v in t.items() if v]
    return "; ".join(parts[:2]) or "–"


def _ours(j: Mapping[str, Any]) -> str:
    parts = []
    for e in j["effects"]:
        if e["mean"] is None:
            parts.append(f"{e['label']}: –")
            continue
        sd = "" if e["sd"] is None else f" ± {format_number(e['sd'], 2)}"
        parts.append(f"{e['label']}: {format_number(e['mean'], 2)}{sd}{(' ' + e['unit']) if e['unit'] else ''}")
    return "; ".join(parts)


def aggregate(cfg: Mapping[str, Any], runs: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> List[Dict[str, Any]]:
    """The seven findings over the seeds: per model the per-seed numbers and the verdict.

    Parameters
    ----------
    cfg : mapping
        The protocol (its ``models`` and ``verdict.min_seed_fraction``).
    runs : sequence of dict
        Outputs of one model and seed (:func:`run_model_seed`).
    seeds : sequence of int
        The seeds of the run, in order (a seed without a run counts as not holding).

    Returns
    -------
    list of 7 dicts
        ``id, claim, where, thesis`` (of :data:`FINDINGS`), ``effects`` (the specs),
        ``by_model``: model name -> ``label``, ``thesis`` (the thesis's number for that model
        or its family), ``per_seed`` (``seed, values, direction, ours, reason``), the fields of
        :func:`judge_seeds` (``verdict``, ``reason``, ``n_holds``, ``effects`` with mean / sd /
        se, …) and ``ours`` (mean ± sd text); ``verdict`` over the models
        (:func:`~nns_cuda.analysis.thesis.verdict.combine`).
    """
    frac = float(cfg["verdict"].get("min_seed_fraction", MIN_FRACTION))
    index = {(r["model"], r["seed"]): finding_values(r.get("results") or {}) for r in runs}
    out = []
    for f in FINDINGS:
        fid, eff = f["id"], EFFECTS[f["id"]]
        by_model: Dict[str, Any] = {}
        for m in cfg["models"]:
            per = [index.get((m["name"], s), {}).get(fid) for s in seeds]
            vals = [p["values"] if p else None for p in per]
            j = judge_seeds(vals, eff, min_fraction=frac)
            rows = [{"seed": s, "values": v, "direction": direction(v, eff),
                     "ours": p["ours"] if p else "–", "reason": (p["reason"] if p else "no run for this seed")}
                    for s, v, p in zip(seeds, vals, per)]
            by_model[m["name"]] = {"label": m["label"], "thesis": _thesis_for(fid, m.get("thesis_key")),
                                   "per_seed": rows, **j, "ours": _ours(j)}
        out.append({**f, "effects": [e.to_dict() for e in eff], "by_model": by_model,
                    "verdict": combine([b["verdict"] for b in by_model.values()])})
    return out


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
class _Sink(io.TextIOBase):
    """A text stream that discards what is written to it."""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        return len(s)


class _Progress:
    def __init__(self, enabled: bool, cfg: Mapping[str, Any], seeds: Sequence[int]):
        self.bar = None
        first = next(iter(_WEIGHTS.values()))
        self.w = {m["name"]: _WEIGHTS.get(m["name"], first) for m in cfg["models"]}
        total = len(seeds) * sum(sum(w[s] for s in STAGES) for w in self.w.values())
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="nns reproduce", unit="", file=sys.stderr, disable=False,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
        self.where = ""

    def at(self, where: str) -> None:
        self.where = where

    def tick(self, model: str, stage: str) -> None:
        if self.bar is not None:
            nxt = STAGES[STAGES.index(stage) + 1] if stage != STAGES[-1] else "done"
            self.bar.set_description(f"nns reproduce: {self.where}, {nxt}")
            self.bar.update(self.w[model][stage])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def reproduce(config: Union[None, str, "os.PathLike[str]", Mapping[str, Any]] = None,
              seeds: Union[None, int, Sequence[int]] = None, quick: bool = False, progress: bool = True, *,
              cache_dir: Optional[str] = None, work_dir: Optional[str] = None, debug: bool = False) -> Dict[str, Any]:
    """Run the reproduction protocol: every seed, every model, the seven findings, the verdicts.

    Parameters
    ----------
    config : path, mapping or None
        The protocol (default: the committed ``protocol.json``).
    seeds : int, sequence of int or None
        None: the protocol's seeds; an int ``N``: its first ``N`` seeds; a list: those seeds.
        Anything but the protocol's seeds is recorded in ``deviations``.
    quick : bool
        The protocol's ``quick`` variant (one seed, small sizes): exercises every stage, the
        numbers say nothing about the thesis.
    progress : bool
        A progress bar with the ETA over all seeds × models × stages (stderr).
    cache_dir : str, optional
        Cache of the rendered data (default ``$NNS_CACHE_DIR`` or ``~/.cache/nns_cuda``).
    work_dir : str, optional
        Keep the training checkpoints there (default: a temporary folder, removed afterwards).
    debug : bool
        Print the traceback of a failed stage.

    Returns
    -------
    dict
        JSON-safe: ``format``, ``quick``, ``protocol`` (as run), ``protocol_sha256`` (of the
        committed file's text when ``config`` is None), ``declaration_sha256`` (of
        docs/reproduction.md), ``deviations``, ``seeds``, ``machine`` (with the load average at
        the start), ``commit``, ``git_dirty``, ``versions``, ``started`` / ``finished`` (ISO
        times), ``seconds`` (wall), ``seconds_per_seed``, ``load_average_at_end``, ``runs`` (one per model and seed:
        :func:`~nns_cuda.analysis.thesis._reproduce_run.run_model_seed`), ``findings``
        (:func:`aggregate`), ``verdicts`` (count per verdict) and ``errors``
        (``"model/seed/stage"`` -> message).
    """
    cfg = load_protocol(config, quick=quick)
    seed_list = _seed_list(cfg, seeds)
    declared = load_protocol(config, quick=False)["seeds"] if not quick else cfg["seeds"]
    deviations = []
    if quick:
        deviations.append("quick run: the protocol's small variant, not the declared protocol")
    if seed_list != [int(s) for s in declared]:
        deviations.append(f"seeds {seed_list} instead of the declared {declared}")
    sha = hashlib.sha256(PROTOCOL_FILE.read_bytes()).hexdigest() if config is None else None
    doc_sha = hashlib.sha256(DECLARATION_FILE.read_bytes()).hexdigest() if DECLARATION_FILE.is_file() else None
    started, t0 = datetime.datetime.now().astimezone(), time.perf_counter()
    prov = _provenance()
    bar = _Progress(progress, cfg, seed_list)
    tmp = tempfile.TemporaryDirectory(prefix="nns_reproduce_") if work_dir is None else None
    wdir = tmp.name if tmp is not None else os.fspath(work_dir)
    runs: List[Dict[str, Any]] = []
    per_seed_s: Dict[str, float] = {}
    # the analyses' own per-batch bars (created with an explicit ``disable=``) would break the one
    # bar with the ETA: their stderr goes to a sink during the run, the bar keeps the real one
    # (with ``debug`` nothing is hidden, so that tracebacks show)
    hide = contextlib.nullcontext() if debug else contextlib.redirect_stderr(_Sink())
    try:
        with hide:
            for i, s in enumerate(seed_list, 1):
                ts = time.perf_counter()
                for m in cfg["models"]:
                    bar.at(f"seed {s} ({i}/{len(seed_list)}), {m['name']}")
                    runs.append(run_model_seed(cfg, m, s, work_dir=wdir, cache_dir=cache_dir, debug=debug,
                                               tick=lambda st, _m=m["name"]: bar.tick(_m, st)))
                per_seed_s[str(s)] = round(time.perf_counter() - ts, 1)
    finally:
        bar.close()
        if tmp is not None:
            tmp.cleanup()
    findings = aggregate(cfg, runs, seed_list)
    errors = {f"{r['model']}/{r['seed']}/{k}": v for r in runs for k, v in r["errors"].items()}
    return {"format": FORMAT, "quick": bool(quick), "protocol": cfg, "protocol_sha256": sha,
            "declaration_sha256": doc_sha,
            "deviations": deviations, "seeds": seed_list, **prov, "started": started.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t0, 1), "seconds_per_seed": per_seed_s,
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "runs": runs,
            "findings": findings, "verdicts": {v: sum(f["verdict"] == v for f in findings) for v in VERDICTS},
            "errors": errors}


def write_json(result: Mapping[str, Any], path: Union[str, "os.PathLike[str]"]) -> Path:
    """Write a :func:`reproduce` result as indented JSON (atomically); returns the path."""
    from nns_cuda.data._io import atomic_write_bytes

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes((json.dumps(result, indent=1, ensure_ascii=False) + "\n").encode("utf-8"), p)


def load_reproduction(path: Union[None, str, "os.PathLike[str]"] = None) -> Optional[Dict[str, Any]]:
    """The reproduction JSON at ``path`` (default: ``docs/results/reproduction.json`` of the
    source tree this package lives in); None when there is none or it is not one."""
    p = Path(path) if path is not None else Path(__file__).resolve().parents[3] / DEFAULT_OUT
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("format") == FORMAT else None


# --------------------------------------------------------------------------------------------
# the README section
# --------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m nns_cuda.analysis.thesis.reproduce [--readme-table FILE] [--write-readme README]``:
    print the README's tables rendered from a reproduction JSON, or write them into the README
    between its markers."""
    p = argparse.ArgumentParser(prog="python -m nns_cuda.analysis.thesis.reproduce",
                                description="Render the README tables of a reproduction JSON.")
    p.add_argument("--readme-table", metavar="FILE", default=DEFAULT_OUT,
                   help=f"the JSON written by `nns reproduce` (default {DEFAULT_OUT})")
    p.add_argument("--write-readme", metavar="README", default=None,
                   help="replace the text between the README's reproduction markers instead of printing")
    a = p.parse_args(argv)
    r = load_reproduction(a.readme_table)
    if r is None:
        print(f"{a.readme_table}: not a reproduction JSON (run `nns reproduce` first)", file=sys.stderr)
        return 2
    if a.write_readme:
        try:
            update_readme(a.write_readme, r)
        except ValueError as e:
            print(str(e), file=sys.stderr)
            return 2
        print(f"wrote the reproduction tables into {a.write_readme}")
        return 0
    print(readme_block(r))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
