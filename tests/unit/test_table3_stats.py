"""Seed statistics of the Table-3 protocol (scripts/experiments/table3_stats.py), by hand."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts/experiments"))

from table3_stats import (
    fmt_k,
    fmt_mean_std,
    gap_percent,
    mean_std,
    ordering_margin,
)


def test_mean_std_is_the_sample_std_and_skips_missing_values() -> None:
    ms = mean_std([1.0, 2.0, 4.0, None, float("nan")])
    assert ms.n == 3 and ms.mean == pytest.approx(7 / 3)
    # ddof = 1: sum of squared deviations / (n - 1)
    dev = [(v - 7 / 3) ** 2 for v in (1.0, 2.0, 4.0)]
    assert ms.std == pytest.approx(math.sqrt(sum(dev) / 2))
    one = mean_std([5.0])
    assert (one.mean, one.std, one.n) == (5.0, None, 1)
    assert mean_std([]) is None and mean_std([None]) is None


def test_gap_percent_is_relative_to_the_reference() -> None:
    assert gap_percent(5.05, 5.0) == pytest.approx(1.0)
    assert gap_percent(4.975, 5.0) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="zero reference"):
        gap_percent(1.0, 0.0)


def test_ordering_margin_pooled_and_paired() -> None:
    lo = {1: 5.00, 2: 5.02, 3: 4.98}
    hi = {1: 5.10, 2: 5.16, 3: 5.10}
    m = ordering_margin(lo, hi)
    s_lo, s_hi = statistics.stdev(lo.values()), statistics.stdev(hi.values())
    diff = statistics.fmean(hi.values()) - statistics.fmean(lo.values())
    assert m["diff"] == pytest.approx(diff)
    assert m["pooled_std"] == pytest.approx(math.sqrt((s_lo**2 + s_hi**2) / 2))
    assert m["in_std"] == pytest.approx(diff / m["pooled_std"])
    d = [hi[s] - lo[s] for s in (1, 2, 3)]
    assert m["paired_in_std"] == pytest.approx(statistics.fmean(d) / statistics.stdev(d))
    assert m["paired_n"] == 3
    # Reversed ordering: negative margins.
    assert ordering_margin(hi, lo)["in_std"] == pytest.approx(-m["in_std"])


def test_ordering_margin_edge_cases() -> None:
    # Zero spread with a difference: infinitely many std; no difference: not computable.
    same = ordering_margin({1: 1.0, 2: 1.0}, {1: 2.0, 2: 2.0})
    assert same["in_std"] == math.inf and same["paired_in_std"] == math.inf
    assert ordering_margin({1: 1.0, 2: 1.0}, {1: 1.0, 2: 1.0})["in_std"] is None
    # One seed: a difference but no std.
    one = ordering_margin({1: 1.0}, {1: 1.5})
    assert one["diff"] == pytest.approx(0.5) and one["in_std"] is None
    # Seeds that do not pair: pooled margin only.
    unpaired = ordering_margin({1: 1.0, 2: 1.2}, {3: 2.0, 4: 2.2})
    assert unpaired["in_std"] is not None and unpaired["paired_n"] == 0
    assert unpaired["paired_in_std"] is None
    assert ordering_margin({}, {1: 1.0})["diff"] is None


def test_formatting() -> None:
    assert fmt_mean_std(mean_std([1.0, 3.0])) == "2.0000 ± 1.4142"
    assert fmt_mean_std({"mean": 2.0, "std": None, "n": 1}, ".2f") == "2.00 ± -"
    assert fmt_mean_std(None) == "-"
    assert (fmt_k(2.04), fmt_k(-0.5), fmt_k(math.inf), fmt_k(None)) == ("+2.0", "-0.5", "+inf", "-")
