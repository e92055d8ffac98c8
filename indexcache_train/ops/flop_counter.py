"""Per-rank FLOP counts of the indexer and distillation operators (tests and benchmarks).

Off by default: :func:`add` is a no-op until :func:`counting` is entered, and callers pass a
function so nothing is computed when counting is off. Counts are *nominal* rectangle FLOPs
(two per multiply-add over every (query row, key) pair the operation is given, masked or not),
so they measure how the work is divided between ranks, not what a kernel that skips masked
tiles executes (with causal masks and contiguous sequence-parallel slices the last TP rank's
rows see more keys: docs/design.md, "Parallelism").

Categories (one per operator stage):

* ``indexer_topk``: the indexer's scores of the rows whose top-k this rank selects;
* ``distill_target``: the head-summed main-attention probabilities this rank computes
  (partial sums over its heads for the rows of every sequence-parallel slice);
* ``distill_kl``: the indexer side of the KL term for this rank's rows (logits, and with
  gradients the two products of the backward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

_counts: dict[str, float] | None = None


@contextmanager
def counting() -> Iterator[dict[str, float]]:
    """Count inside the block; yields the ``category -> FLOPs`` dict being filled."""
    global _counts
    previous, _counts = _counts, {}
    try:
        yield _counts
    finally:
        _counts = previous


def add(category: str, flops: Callable[[], float]) -> None:
    """Add ``flops()`` to ``category`` when counting (``flops`` is not called otherwise)."""
    if _counts is not None:
        _counts[category] = _counts.get(category, 0.0) + float(flops())
