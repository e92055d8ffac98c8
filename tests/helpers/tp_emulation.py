"""A tensor-parallel group emulated in one process, for the distillation terms' TP reduction.

The terms call ``split.reduce(parts)`` once per row chunk, in the same order on every rank
(:class:`indexcache_train.ops.row_split.RowSplit`). :func:`emulate_tp` runs each "rank" twice:
first recording its per-slice partials call by call, then again with a reduction that returns
the sum of every rank's recorded partial for this rank's slice. Each rank computes its own
heads and (under sequence parallelism) its own rows, so the results can be compared with one
all-heads, all-rows run on one device (CPU interpreter or one GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")
Reduce = Callable[[Sequence[torch.Tensor]], torch.Tensor]


@dataclass
class EmulatedSplit:
    """A :class:`~indexcache_train.ops.row_split.RowReduction` whose reduction is a callback."""

    slices: int
    rank: int
    tp_size: int
    reduce_fn: Reduce

    def reduce(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.reduce_fn(parts)


def emulate_tp(
    run: Callable[[int, EmulatedSplit], T], tp: int, sequence_parallel: bool = True
) -> list[T]:
    """``[run(r, split_r) for r in range(tp)]`` with the reductions of a real TP group.

    ``run(r, split)`` must do rank ``r``'s work (its heads; its rows when
    ``sequence_parallel``) and call ``split.reduce`` in a rank-independent order.
    """
    slices = tp if sequence_parallel else 1
    recorded: list[list[list[torch.Tensor]]] = [[] for _ in range(tp)]

    def own(r: int) -> int:
        return r if sequence_parallel else 0

    for r in range(tp):

        def record(parts: Sequence[torch.Tensor], r: int = r) -> torch.Tensor:
            recorded[r].append([p.clone() for p in parts])
            return parts[own(r)]  # not the sum: this pass's results are discarded

        run(r, EmulatedSplit(slices, own(r), tp, record))
    results = []
    for r in range(tp):
        calls = iter(range(len(recorded[r])))

        def summed(parts: Sequence[torch.Tensor], r: int = r, calls=calls) -> torch.Tensor:
            i, j = next(calls), own(r)
            parts[j].copy_(torch.stack([recorded[q][i][j] for q in range(tp)]).sum(0))
            return parts[j]

        results.append(run(r, EmulatedSplit(slices, own(r), tp, summed)))
    return results


def combine_ranks(
    per_rank: list[list[torch.Tensor]], sequence_parallel: bool = True
) -> list[torch.Tensor]:
    """``(loss, dq, dk, dw)`` of the whole group from each rank's: losses and ``dk`` summed,
    ``dq``/``dw`` concatenated over the row slices (one shared copy without SP)."""
    if not sequence_parallel:
        return per_rank[0]
    loss, dq, dk, dw = zip(*per_rank)
    return [sum(loss), torch.cat(dq, 1), sum(dk), torch.cat(dw, 1)]


def tp_error(
    term: Callable[..., torch.Tensor],
    attn: tuple,
    indexer: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    idx_scale: float,
    tp: int,
    sequence_parallel: bool = True,
    **kw,
) -> dict[str, float]:
    """Relative errors of ``loss``, ``dq``, ``dk``, ``dw`` between an emulated TP group and one
    all-heads run of ``term(aq, k, lse, rows_arg, ascale, iq, ik, iw, iscale, split, **kw)``.

    ``attn = (aq [B,S,H,D], k, lse [B,S,H], rows_arg, ascale)``: ``k`` is the dense per-head
    ``[B,T,H,D]`` (split by heads too) or the sparse latent ``[B,T,D]``; ``rows_arg`` the key
    range (dense) or top-k (sparse), both over every row. Rank ``r`` holds heads
    ``r*H/tp ...`` and, under sequence parallelism, indexer rows ``r*S/tp ...``.
    """
    from tests.helpers.kernel_testing import rel_err

    aq, k, lse, rows_arg, ascale = attn
    iq, ik, iw = indexer
    S, H = aq.shape[1:3]
    n, hh = (S // tp if sequence_parallel else S), H // tp

    def run(rows: slice, heads: slice, split) -> list[torch.Tensor]:
        leaves = [x.detach().clone().requires_grad_() for x in (iq[:, rows], ik, iw[:, rows])]
        k_r = k[:, :, heads] if k.dim() == 4 else k
        loss = term(aq[:, :, heads], k_r, lse[:, :, heads], rows_arg, ascale, *leaves, idx_scale, split, **kw)  # fmt: skip
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    full = run(slice(None), slice(None), None)
    per_rank = emulate_tp(
        lambda r, split: run(
            slice(r * n, r * n + n) if sequence_parallel else slice(None),
            slice(r * hh, r * hh + hh),
            split,
        ),
        tp,
        sequence_parallel,
    )
    group = combine_ranks(per_rank, sequence_parallel)
    names = ("loss", "dq", "dk", "dw")
    return {n: rel_err(a.float(), b.float()) for n, a, b in zip(names, group, full)}
