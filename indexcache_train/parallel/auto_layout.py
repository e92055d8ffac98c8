"""Automatic pipeline layout: cut only at share-group boundaries, minimise the slowest chunk.

The layers are first grouped into *units* no chunk boundary may cut (:func:`share_units`), then
the unit sequence is split into ``pp * vpp`` contiguous, non-empty chunks by an exact dynamic
program (:func:`partition_min_max`):

1. minimise the largest chunk cost ``B*`` over every such split (the pipeline runs at the pace of
   its slowest chunk);
2. among the splits that reach ``B*``, maximise the smallest chunk cost (no needlessly idle rank);
3. among those, minimise the sum of squared chunk costs (the spread of the middle stages).

Costs are :class:`LayerCosts`; the embedding is charged to the first chunk, the loss to the last.
Guarantee, with ``w_max`` the costliest unit counting the embedding in the first unit and the loss
in the last: ``B* <= total / chunks + w_max`` (closing each chunk greedily once it passes the
mean never needs more than ``chunks`` chunks), and ``B*`` is optimal, so no layout that respects
the share groups has a cheaper slowest chunk. Observed, not proven: ``max - min <= w_max`` (it
held on all 1.7M splits of every sequence of up to 7 units with weights in {1, 2, 3, 5, 8}, with
and without head/tail extras, and the tests check it on every layout they build).
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Sequence

from indexcache_train.parallel.layout_model import LayerCosts, PipelineLayout, PipelineLayoutError
from indexcache_train.schedule import IndexCacheSchedule


def share_units(schedule: IndexCacheSchedule) -> list[tuple[int, ...]]:
    """Runs of consecutive global layers that must stay in one chunk, in execution order.

    One unit per trunk share group (a Full trunk layer and the Shared trunk layers after it). The
    MTP layers form one unit, because Megatron keeps every MTP layer in one chunk after the trunk.
    When an MTP layer is Shared its source is a trunk layer, so the MTP unit is merged with the
    units from that source's on: the source (and everything after it) lands in the last chunk.

    Args:
        schedule: The model's IndexCache schedule.

    Returns:
        Units covering ``0 .. num_layers + num_mtp_layers - 1`` exactly once, in order.
    """
    n = schedule.num_layers
    bounds = [*schedule.trunk_full_layers, n]
    units = [tuple(range(a, b)) for a, b in itertools.pairwise(bounds)]
    mtp = tuple(range(n, n + schedule.num_mtp_layers))
    if not mtp:
        return units
    sources = [schedule.source(i) for i in mtp if not schedule.is_full(i)]
    if not sources:
        return [*units, mtp]
    first = bounds.index(min(sources))
    return [*units[:first], tuple(itertools.chain(*units[first:])) + mtp]


def partition_min_max(
    weights: Sequence[float], parts: int, head: float = 0.0, tail: float = 0.0
) -> list[int]:
    """Split ``weights`` into ``parts`` contiguous non-empty runs: min-max cost, then max-min.

    Args:
        weights: Cost of each unit, in order.
        parts: Number of runs (chunks); ``1 <= parts <= len(weights)``.
        head: Extra cost of the first run (the embedding).
        tail: Extra cost of the last run (the loss).

    Returns:
        Cut points ``[0, c1, ..., len(weights)]``; run ``k`` is ``weights[cuts[k]:cuts[k+1]]``.
    """
    m = len(weights)
    if not 1 <= parts <= m:
        raise PipelineLayoutError(f"cannot split {m} units into {parts} non-empty chunks.")
    prefix = list(itertools.accumulate(weights, initial=0.0))

    def cost(i: int, j: int) -> float:
        return prefix[j] - prefix[i] + (head if i == 0 else 0.0) + (tail if j == m else 0.0)

    # Three exact passes, each over the splits the previous passes allow: the largest chunk as
    # small as possible, then the smallest as large as possible, then the sum of squared costs
    # (the variance, total being fixed) as small as possible, so no stage is needlessly light.
    best_max = _solve(m, parts, cost, max, operator.lt, -math.inf)[0]
    hi = best_max + _tol(best_max)  # tolerance only guards float compares of equal sums
    best_min = _solve(m, parts, cost, min, operator.gt, math.inf, hi=hi)[0]
    lo = best_min - _tol(best_min)
    _, choice = _solve(m, parts, cost, _add_square, operator.lt, 0.0, lo=lo, hi=hi)
    cuts = [m]
    for k in range(parts, 0, -1):
        cuts.append(choice[k][cuts[-1]])
    return cuts[::-1]


def _add_square(total: float, run_cost: float) -> float:
    return total + run_cost * run_cost


def _tol(value: float) -> float:
    return 1e-9 * max(1.0, abs(value))


def _solve(
    m: int,
    parts: int,
    cost: Callable[[int, int], float],
    combine: Callable[[float, float], float],
    better: Callable[[float, float], bool],
    initial: float,
    lo: float = -math.inf,
    hi: float = math.inf,
) -> tuple[float, list[list[int]]]:
    """DP over ``score[k][j]``: units ``0..j-1`` split into ``k`` runs each costing ``lo..hi``.

    A split's score folds ``combine(score_so_far, run_cost)`` over its runs from ``initial``
    (``max``, ``min`` or a sum of squares); ``better`` says which score wins. Returns the best
    score for all ``m`` units in ``parts`` runs and, per ``(k, j)``, where the best ``k``-th run
    starts.
    """
    score: list[list[float | None]] = [[None] * (m + 1) for _ in range(parts + 1)]
    choice = [[0] * (m + 1) for _ in range(parts + 1)]
    score[0][0] = initial
    for k in range(1, parts + 1):
        for j in range(k, m - (parts - k) + 1):
            for i in range(k - 1, j):
                prev = score[k - 1][i]
                if prev is None:
                    continue
                c = cost(i, j)
                if not lo <= c <= hi:
                    continue
                new = combine(prev, c)
                if score[k][j] is None or better(new, score[k][j]):
                    score[k][j], choice[k][j] = new, i
    best = score[parts][m]
    if best is None:  # unreachable: each pass allows the split the previous pass found
        raise PipelineLayoutError(f"no split of {m} units into {parts} chunks fits the bounds.")
    return best, choice


def auto_layout(
    schedule: IndexCacheSchedule,
    pp_size: int,
    vpp_size: int | None = None,
    costs: LayerCosts | None = None,
) -> PipelineLayout:
    """The cost-balanced layout that splits only at share-group boundaries.

    Args:
        schedule: The model's IndexCache schedule (trunk and MTP layers).
        pp_size: ``pipeline_model_parallel_size``.
        vpp_size: ``virtual_pipeline_model_parallel_size``; every virtual chunk boundary is a
            share-group boundary too (Megatron builds each chunk's layers separately).
        costs: Per-layer cost model; defaults to :class:`LayerCosts`.

    Returns:
        The layout; ``.to_megatron()`` gives the ``pipeline_model_parallel_layout`` string.

    Raises:
        PipelineLayoutError: ``pp_size``/``vpp_size`` below 1, or more chunks than units.
    """
    costs = costs or LayerCosts()
    chunks = check_sizes(pp_size, vpp_size)
    units = share_units(schedule)
    if chunks > len(units):
        raise PipelineLayoutError(
            f"cannot place {chunks} pipeline chunks (pp={pp_size} x vpp={vpp_size or 1}) on "
            f"{len(units)} share groups: every chunk must start on a Full layer and hold at least "
            f"one share group ({schedule.describe()}). Fix: use at most {len(units)} chunks, or "
            "more Full layers."
        )
    weights = [sum(costs.layer(schedule, i) for i in unit) for unit in units]
    cuts = partition_min_max(weights, chunks, head=costs.embedding, tail=costs.loss)
    layers = [tuple(itertools.chain(*units[a:b])) for a, b in itertools.pairwise(cuts)]
    return PipelineLayout(tuple(layers), pp_size, schedule.num_layers)


def unit_costs(schedule: IndexCacheSchedule, costs: LayerCosts) -> list[float]:
    """Cost of each :func:`share_units` unit, the embedding in the first, the loss in the last."""
    out = [sum(costs.layer(schedule, i) for i in unit) for unit in share_units(schedule)]
    out[0] += costs.embedding
    out[-1] += costs.loss
    return out


def check_sizes(pp_size: int, vpp_size: int | None) -> int:
    """Validate ``pp_size``/``vpp_size`` and return the number of model chunks."""
    checks = [("pipeline_model_parallel_size", pp_size)]
    if vpp_size is not None:
        checks.append(("virtual_pipeline_model_parallel_size", vpp_size))
    for key, value in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PipelineLayoutError(f"{key} must be an integer >= 1, got {value!r}.")
    if (vpp_size or 1) > 1 and pp_size == 1:
        raise PipelineLayoutError(
            f"virtual_pipeline_model_parallel_size={vpp_size} needs "
            "pipeline_model_parallel_size > 1 (interleaving runs over pipeline ranks)."
        )
    return pp_size * (vpp_size or 1)
