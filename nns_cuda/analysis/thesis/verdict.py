"""The verdict rule: from per-seed numbers to "reproduced", "not reproduced", "opposite".

A finding is measured by one or more *effects*: signed numbers whose direction the thesis
claims (for instance "the loss change when the 20 most diverse filters are masked, %", which
the thesis finds positive). An :class:`Effect` says which way is the thesis's (``sense``), the
value beyond which one run agrees with it (``hold``) and the value beyond which one run
contradicts it (``opposite``).

One run (one seed) **holds** when every effect lies beyond its ``hold`` value, and is
**opposite** on an effect that lies beyond its ``opposite`` value the other way. Over ``n``
seeds (docs/reproduction.md, declared before the full run):

* **reproduced**: the run holds in at least ``ceil(min_fraction · n)`` seeds (4 of 5) and,
  for every effect, the mean lies beyond ``hold`` by more than its standard error
  ``sd / sqrt(m)`` (``m`` seeds with a number, ``m ≥ 2``);
* **opposite**: for one effect, at least ``ceil(min_fraction · n)`` seeds are opposite on it
  and its mean lies beyond ``opposite`` (the other way) by more than its standard error;
* **not computed**: no seed has the numbers;
* **not reproduced**: anything else (mixed directions, too few seeds, a mean within one
  standard error).

With ``min_fraction > 1/2`` the first two exclude each other. A single run (the demo) is
judged by :func:`direction` alone.

>>> from nns_cuda.analysis.thesis.verdict import Effect, judge_seeds
>>> e = [Effect("d", "OF − WT anomaly filters", "filters")]
>>> judge_seeds([{"d": 3}, {"d": 5}, {"d": 2}, {"d": 4}, {"d": -1}], e)["verdict"]
'reproduced'
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = ["Effect", "REPRODUCED", "NOT_REPRODUCED", "OPPOSITE", "NOT_COMPUTED", "VERDICTS", "MIN_FRACTION",
           "direction", "summarise", "judge_seeds", "combine", "min_seeds"]

REPRODUCED, NOT_REPRODUCED, OPPOSITE, NOT_COMPUTED = "reproduced", "not reproduced", "opposite", "not computed"
#: Every verdict, in the order reports list them.
VERDICTS = (REPRODUCED, NOT_REPRODUCED, OPPOSITE, NOT_COMPUTED)
#: Default share of the seeds in which the direction must hold (4 of 5).
MIN_FRACTION = 0.8


@dataclass(frozen=True)
class Effect:
    """One signed number of a finding and the direction the thesis claims for it.

    Parameters
    ----------
    key : str
        Name of the number in a seed's values.
    label : str
        What it is, for reports.
    unit : str
        Its unit ("" when none).
    sense : {1, -1}
        ``1``: the thesis's direction is larger values; ``-1``: smaller values.
    hold : float
        A run agrees with the thesis when ``sense · (value − hold) > 0``.
    opposite : float
        A run contradicts the thesis when ``sense · (opposite − value) > 0``.
    """

    key: str
    label: str
    unit: str = ""
    sense: int = 1
    hold: float = 0.0
    opposite: float = 0.0

    def holds(self, v: float) -> bool:
        """Whether the value ``v`` agrees with the thesis."""
        return self.sense * (v - self.hold) > 0

    def contradicts(self, v: float) -> bool:
        """Whether the value ``v`` goes the other way."""
        return self.sense * (self.opposite - v) > 0

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-safe dict."""
        return asdict(self)


def _finite(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def direction(values: Optional[Mapping[str, Any]], effects: Sequence[Effect]) -> Optional[str]:
    """The direction of one run.

    Parameters
    ----------
    values : mapping of effect key to number, or None
    effects : sequence of Effect

    Returns
    -------
    str or None
        ``"holds"`` (every effect beyond its ``hold``), ``"opposite"`` (some effect beyond its
        ``opposite`` the other way), ``"neither"``, or None when a number is missing.
    """
    if values is None:
        return None
    vs = [_finite(values.get(e.key)) for e in effects]
    if any(v is None for v in vs):
        return None
    if all(e.holds(v) for e, v in zip(effects, vs)):
        return "holds"
    if any(e.contradicts(v) for e, v in zip(effects, vs)):
        return "opposite"
    return "neither"


def summarise(xs: Sequence[Optional[float]]) -> Dict[str, Any]:
    """Mean, sample standard deviation (``ddof = 1``) and standard error of the numbers in ``xs``.

    Parameters
    ----------
    xs : sequence of float or None
        None entries (seeds without the number) are left out.

    Returns
    -------
    dict
        ``n`` (numbers used), ``mean``, ``sd`` and ``se`` (None when undefined: ``sd`` and
        ``se`` need two numbers).
    """
    v = [f for f in (_finite(x) for x in xs) if f is not None]
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "se": None}
    mean = sum(v) / n
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "se": None}
    sd = math.sqrt(sum((a - mean) ** 2 for a in v) / (n - 1))
    return {"n": n, "mean": mean, "sd": sd, "se": sd / math.sqrt(n)}


def min_seeds(n: int, min_fraction: float = MIN_FRACTION) -> int:
    """Seeds out of ``n`` in which a direction must hold: ``ceil(min_fraction · n)`` (4 of 5)."""
    return max(1, math.ceil(min_fraction * n - 1e-9))


def _beyond(stat: Mapping[str, Any], target: float, sense: int) -> bool:
    """Whether the mean lies beyond ``target`` in direction ``sense`` by more than its standard error."""
    if stat["mean"] is None or stat["se"] is None:
        return False
    return sense * (stat["mean"] - target) > stat["se"]


def judge_seeds(per_seed: Sequence[Optional[Mapping[str, Any]]], effects: Sequence[Effect], *,
                min_fraction: float = MIN_FRACTION) -> Dict[str, Any]:
    """Judge a finding from its per-seed numbers by the rule of the module docstring.

    Parameters
    ----------
    per_seed : sequence of length n_seeds of (mapping effect key -> number) or None
        One entry per seed of the protocol; None (or a missing number) for a seed whose run
        did not produce it — it counts as a seed where the direction does not hold.
    effects : sequence of Effect
    min_fraction : float
        Share of the seeds that must agree (``> 1/2``).

    Returns
    -------
    dict
        ``verdict``, ``reason`` (one line), ``n_seeds``, ``n_computed`` (seeds with every
        number), ``n_holds``, ``n_opposite`` (seeds opposite on some effect), ``needed``
        (seeds that must agree), ``directions`` (per seed: "holds" / "opposite" / "neither" /
        None) and ``effects``: per effect its spec, ``values`` [n_seeds], ``mean``, ``sd``,
        ``se``, ``n``, ``n_holds`` and ``n_opposite``.
    """
    if not 0.5 < min_fraction <= 1:
        raise ValueError(f"judge_seeds: min_fraction must be in (0.5, 1], got {min_fraction}")
    if not effects:
        raise ValueError("judge_seeds: a finding needs at least one effect")
    n = len(per_seed)
    need = min_seeds(n, min_fraction)
    dirs = [direction(v, effects) for v in per_seed]
    eff: List[Dict[str, Any]] = []
    for e in effects:
        vals = [None if v is None else _finite(v.get(e.key)) for v in per_seed]
        stat = summarise(vals)
        eff.append({**e.to_dict(), "values": vals, **stat,
                    "n_holds": sum(x is not None and e.holds(x) for x in vals),
                    "n_opposite": sum(x is not None and e.contradicts(x) for x in vals)})
    n_comp = sum(d is not None for d in dirs)
    n_hold = sum(d == "holds" for d in dirs)
    n_opp = sum(d == "opposite" for d in dirs)
    out = {"n_seeds": n, "n_computed": n_comp, "n_holds": n_hold, "n_opposite": n_opp, "needed": need,
           "directions": dirs, "effects": eff}
    if n_comp == 0:
        return {**out, "verdict": NOT_COMPUTED, "reason": "no seed produced the numbers"}
    if n_hold >= need and all(_beyond(s, s["hold"], s["sense"]) for s in eff):
        return {**out, "verdict": REPRODUCED,
                "reason": f"holds in {n_hold} of {n} seeds; every mean beyond its threshold by more than one SE"}
    for s in eff:
        if s["n_opposite"] >= need and _beyond(s, s["opposite"], -s["sense"]):
            return {**out, "verdict": OPPOSITE,
                    "reason": f"{s['label']}: the other way in {s['n_opposite']} of {n} seeds, "
                              "mean beyond its threshold by more than one SE"}
    why = [f"holds in {n_hold} of {n} seeds (needs {need})"]
    if n_comp < 2:
        why.append("fewer than two seeds: no standard error")
    else:
        weak = [s["label"] for s in eff if not _beyond(s, s["hold"], s["sense"])]
        if weak:
            why.append("mean within one SE of the threshold or the other way: " + "; ".join(weak))
    return {**out, "verdict": NOT_REPRODUCED, "reason": ", ".join(why)}


def combine(verdicts: Sequence[str]) -> str:
    """One verdict from the verdicts of several models: the common one when they agree, "not
    computed" when none was computed, else "not reproduced"."""
    vs = list(verdicts)
    if not vs or all(v == NOT_COMPUTED for v in vs):
        return NOT_COMPUTED
    if all(v == vs[0] for v in vs):
        return vs[0]
    return NOT_REPRODUCED
