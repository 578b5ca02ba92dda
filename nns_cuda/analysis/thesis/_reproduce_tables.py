"""Markdown tables of a reproduction result (private; re-exported by ``reproduce``).

:func:`readme_table` is the README's "Does it reproduce the thesis?" table, :func:`chapter6_table`
the anomaly-criteria counts per epoch checkpoint, :func:`readme_block` both, and
:func:`update_readme` writes that block into the README between :data:`README_BEGIN` and
:data:`README_END`, so that the README's numbers are rendered from the JSON, never typed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from nns_cuda.analysis.thesis import format_number

__all__ = ["README_BEGIN", "README_END", "readme_table", "chapter6_table", "readme_block", "readme_section",
           "update_readme"]

#: The README lines between which :func:`update_readme` writes :func:`readme_block`.
README_BEGIN = "<!-- reproduction tables: rendered from docs/results/reproduction.json, do not edit -->"
README_END = "<!-- end of reproduction tables -->"

#: Criterion columns of :func:`chapter6_table`: (key in the counts, header).
_CRITERIA = (("imbalanced", "imbalanced (1)"), ("high_ch", "high CH (2)"), ("high_activation", "active (3)"),
             ("all_three", "all three"))


def _cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _load(result: Mapping[str, Any]) -> str:
    a, b = result.get("machine", {}).get("load_average_at_start"), result.get("load_average_at_end")
    if not a or not b:
        return ""
    return f", load average {a[0]:.1f} at the start and {b[0]:.1f} at the end (other processes share the cores)"


def readme_table(result: Mapping[str, Any]) -> str:
    """The README's "Does it reproduce the thesis?" table (Markdown) from a reproduction result.

    Parameters
    ----------
    result : mapping
        The JSON of :func:`~nns_cuda.analysis.thesis.reproduce.reproduce`.

    Returns
    -------
    str
        A line on the run (date, seeds, commit, machine, wall time, load), then one table row per
        finding and model: the thesis's figure, ours as mean ± sd over the seeds (and why
        some seeds have no numbers), the seeds
        where the thesis's direction holds, the verdict; the finding's overall verdict on its
        first row.
    """
    n = len(result.get("seeds") or [])
    mach = result.get("machine") or {}
    head = (f"Run of {str(result.get('finished', '?'))[:10]}: {n} seed(s), commit "
            f"{(result.get('commit') or '?')[:10]}{' (with uncommitted changes)' if result.get('git_dirty') else ''}, "
            f"{mach.get('cpu_count', '?')} CPU cores, wall time {format_number((result.get('seconds') or 0) / 60, 1)} min"
            + _load(result) + ("; QUICK RUN, not the protocol" if result.get("quick") else "") + ".")
    lines = [head, "",
             "| # | finding | model | thesis | ours (mean ± sd over seeds) | seeds holding | verdict | overall |",
             "|---|---|---|---|---|---|---|---|"]
    for i, f in enumerate(result.get("findings") or [], 1):
        for k, b in enumerate(f["by_model"].values()):
            first = k == 0
            why = sorted({p["reason"] for p in b["per_seed"] if p.get("values") is None and p.get("reason")})
            ours = b["ours"] + (f" (no numbers: {'; '.join(why)})" if why else "")
            lines.append("| " + " | ".join(_cell(c) for c in (
                i if first else "", f"{f['claim']} ({f['where']})" if first else "", b["label"], b["thesis"], ours,
                f"{b['n_holds']}/{b['n_seeds']}", b["verdict"], f"**{f['verdict']}**" if first else "")) + " |")
    return "\n".join(lines)


def _mean(xs: Sequence[Optional[float]]) -> Optional[float]:
    v = [float(x) for x in xs if x is not None]
    return sum(v) / len(v) if v else None


def _counts_cell(rows: Sequence[Mapping[str, Any]], exp: str, key: str, per_seed: bool) -> str:
    xs = [r[exp][key] for r in rows]
    m = _mean(xs)
    txt = format_number(m, 1)
    return f"{txt} ({', '.join(str(x) for x in xs)})" if per_seed else txt


def chapter6_table(result: Mapping[str, Any]) -> str:
    """How many filters meet each anomaly criterion, per epoch checkpoint (Markdown).

    Parameters
    ----------
    result : mapping
        The JSON of :func:`~nns_cuda.analysis.thesis.reproduce.reproduce`.

    Returns
    -------
    str
        A line with λ as a count and as a fraction of the GMM samples (and which one the
        protocol uses), then per model one row per counted epoch (present in every seed) and
        one for the well-trained checkpoint: the mean over the seeds of the filters meeting
        criterion 1, 2, 3 and all three with the experiment-1 parameters (all three also per
        seed), and all three with the experiment-3 parameters.
    """
    runs = [r for r in result.get("runs") or [] if r.get("chapter6")]
    if not runs:
        return "No Chapter 6 counts in this run."
    c6p = (result.get("protocol") or {}).get("analyses", {}).get("chapter6", {})
    lam = runs[0]["chapter6"]["lambda"]
    lam_txt = "; ".join(f"{name.replace('_', ' ')}: λ = {format_number(v['count'], 0)} samples = "
                        f"{100 * v['fraction_of_gmm_samples']:.1f} % of the {runs[0]['chapter6']['n_samples']} GMM samples"
                        for name, v in lam.items())
    lines = [f"Filters meeting each anomaly criterion (mean over seeds; per seed in brackets). {lam_txt}; "
             f"the protocol reads λ as a **{c6p.get('lambda_is', 'count')}**.", "",
             "| model | checkpoint | val. loss | " + " | ".join(h for _, h in _CRITERIA)
             + " | all three, experiment 3 |", "|---|---|---|" + "---|" * (len(_CRITERIA) + 1)]
    by_model: Dict[str, List[Mapping[str, Any]]] = {}
    for r in runs:
        by_model.setdefault(r["model"], []).append(r)
    for model, rs in by_model.items():
        label = rs[0].get("label", model)
        n_f = rs[0]["chapter6"]["checkpoints"][0]["experiment_1"]["n_filters"]
        every = max(1, int(c6p.get("count_every") or 1))
        fixed = set.intersection(*[{c["epoch"] for c in r["chapter6"]["checkpoints"]
                                    if c["epoch"] % every == 0 or c["overfitted"]} for r in rs])
        groups = [(str(e) + (" (OF)" if all(next(c for c in r["chapter6"]["checkpoints"] if c["epoch"] == e)["overfitted"]
                                               for r in rs) else ""),
                   [next(c for c in r["chapter6"]["checkpoints"] if c["epoch"] == e) for r in rs])
                  for e in sorted(fixed)]
        wt = [next(c for c in r["chapter6"]["checkpoints"] if c["well_trained"]) for r in rs]
        groups.append((f"WT (epochs {', '.join(str(c['epoch']) for c in wt)})", wt))
        for k, (name, rows) in enumerate(groups):
            vl = _mean([c.get("val_loss") for c in rows])
            cells = [f"{label} ({n_f} filters)" if k == 0 else "", name, format_number(vl, 3)]
            cells += [_counts_cell(rows, "experiment_1", key, key == "all_three") for key, _ in _CRITERIA]
            cells.append(_counts_cell(rows, "experiment_3", "all_three", True))
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def readme_block(result: Mapping[str, Any]) -> str:
    """:func:`readme_table` and :func:`chapter6_table`, as the README shows them."""
    return readme_table(result) + "\n\n" + chapter6_table(result)


def readme_section(text: str) -> Optional[str]:
    """The text between the README's markers (without them and the blank lines around), or None."""
    if README_BEGIN not in text or README_END not in text:
        return None
    return text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip("\n")


def update_readme(path: Union[str, "os.PathLike[str]"], result: Mapping[str, Any]) -> Path:
    """Replace the text between :data:`README_BEGIN` and :data:`README_END` in the file ``path``
    with :func:`readme_block` of ``result``; returns the path.

    Raises
    ------
    ValueError
        When the file lacks one of the markers (add both lines where the tables belong).
    """
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if readme_section(text) is None:
        raise ValueError(f"{p}: no reproduction markers; add the lines {README_BEGIN!r} and {README_END!r} "
                         "where the tables belong")
    before, rest = text.split(README_BEGIN, 1)
    after = rest.split(README_END, 1)[1]
    p.write_text(f"{before}{README_BEGIN}\n{readme_block(result)}\n{README_END}{after}", encoding="utf-8")
    return p

