"""Seed statistics of the Table-3 protocol (issue #24): mean ± std, gaps, ordering margins.

Pure Python (no torch, no numpy), so the table can be rendered and tested anywhere.

Definitions (the ones ``docs/LOG.md`` quotes):

* ``std`` is the sample standard deviation over seeds (``ddof = 1``); None with one seed.
* gap of arm X to the reference (a): ``100 * (mean_X - mean_a) / mean_a`` (% of (a)'s value;
  positive = X is worse for a loss).
* ordering "lo < hi" (lower is better) holds by ``k`` seed standard deviations:
  ``k = (mean_hi - mean_lo) / pooled`` with ``pooled = sqrt((std_lo^2 + std_hi^2) / 2)``;
  negative k: the ordering is reversed. Paired version: the per-seed differences
  ``hi_s - lo_s`` (same data order per seed), ``k_paired = mean(d) / std(d)``.
  ``k`` is ``inf`` when the spread is exactly 0 and the difference is not, and None when it
  cannot be computed (fewer than 2 seeds on a side, or nothing paired).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample std of one metric over seeds."""

    mean: float
    std: float | None
    n: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


def mean_std(values: Sequence[float]) -> MeanStd | None:
    """Mean and sample std (None for one value); None for no finite value."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    return MeanStd(
        statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals)
    )


def gap_percent(value: float, reference: float) -> float:
    """``100 * (value - reference) / reference``."""
    if reference == 0:
        raise ValueError("gap to a zero reference is undefined")
    return 100.0 * (value - reference) / reference


def _ratio(diff: float, spread: float | None) -> float | None:
    if spread is None:
        return None
    if spread == 0:
        return math.copysign(math.inf, diff) if diff != 0 else None
    return diff / spread


def ordering_margin(
    lo: Mapping[int, float], hi: Mapping[int, float]
) -> dict[str, float | int | None]:
    """How far ``mean(hi) - mean(lo)`` is from 0 in seed std (pooled and paired by seed).

    Args:
        lo: Seed -> value of the arm expected to be lower (better).
        hi: Seed -> value of the arm expected to be higher.
    """
    a, b = mean_std(list(lo.values())), mean_std(list(hi.values()))
    if a is None or b is None:
        return {"diff": None, "in_std": None, "paired_in_std": None, "paired_n": 0}
    diff = b.mean - a.mean
    pooled = (
        math.sqrt((a.std**2 + b.std**2) / 2) if a.std is not None and b.std is not None else None
    )
    common = sorted(set(lo) & set(hi))
    d = mean_std([hi[s] - lo[s] for s in common])
    paired = _ratio(d.mean, d.std) if d is not None else None
    return {
        "diff": diff,
        "pooled_std": pooled,
        "in_std": _ratio(diff, pooled),
        "paired_in_std": paired,
        "paired_n": len(common),
    }


def fmt_mean_std(ms: MeanStd | dict | None, spec: str = ".4f") -> str:
    """``"5.1234 ± 0.0012"`` (``± -`` with one seed; ``-`` for nothing); ``spec`` formats both."""
    if ms is None:
        return "-"
    if isinstance(ms, dict):
        ms = MeanStd(ms["mean"], ms["std"], ms["n"])
    std = "-" if ms.std is None else format(ms.std, spec)
    return f"{format(ms.mean, spec)} ± {std}"


def fmt_k(k: float | None) -> str:
    """A margin in seed std: ``"+3.1"``, ``"inf"``, ``"-"`` (not computable)."""
    if k is None:
        return "-"
    if math.isinf(k):
        return "+inf" if k > 0 else "-inf"
    return f"{k:+.1f}"
