"""Which query rows a tensor-parallel rank owns for the indexer and the distillation terms.

Under sequence parallelism each TP rank receives its own contiguous slice of the (CP-local)
rows, but the main attention runs *all* rows for its slice of the heads. The indexer and the
distillation terms only need per-row work, so each rank does them for its own slice:

* the indexer's queries and head weights come from the rank's own rows (no gather), its keys
  are all-gathered once, and the top-k is all-gathered only where a consumer needs every row
  (the sparse attention runs all rows for this rank's heads): :meth:`RowSplit.gather_rows`;
* a head-summed target needs every head for the rank's rows, while each rank holds only its
  heads for every row: each rank computes *partial* head sums for the rows of every slice, and
  :meth:`RowSplit.reduce` sums slice ``j`` over the TP group onto rank ``j`` (a reduce-scatter,
  or one reduce per slice when the slices' key windows differ in width).

Without sequence parallelism (TP only) every rank holds all rows: one slice, and the reduction
is an all-reduce (each rank then computes every row's terms, as before).

Shape legend: B batch, S rows of all slices, N rows of one slice, X anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist


class RowReduction(Protocol):
    """What the fused distillation kernels need of a split (tests pass a one-process stand-in)."""

    slices: int
    rank: int

    @property
    def tp_size(self) -> int: ...

    def reduce(self, parts: Sequence[torch.Tensor]) -> torch.Tensor: ...


@dataclass(frozen=True)
class RowSplit:
    """``slices`` equal contiguous row slices over ``group``; this rank owns slice ``rank``.

    ``slices`` is the TP size under sequence parallelism and 1 otherwise (``rank`` 0, and the
    reduction all-reduces the one slice). ``group=None``: one process, nothing to reduce.
    """

    slices: int = 1
    rank: int = 0
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if self.slices < 1 or not 0 <= self.rank < self.slices:
            raise ValueError(f"RowSplit rank {self.rank} outside {self.slices} slice(s)")
        if self.slices > 1 and (self.group is None or self.group.size() != self.slices):
            raise ValueError(
                f"RowSplit with {self.slices} slices needs a process group of that size"
            )

    @staticmethod
    def build(group: dist.ProcessGroup | None, sequence_parallel: bool) -> RowSplit:
        """The split of a TP group: one slice per rank under SP, else one shared slice."""
        size = 1 if group is None else group.size()
        if size == 1:
            return RowSplit()
        if sequence_parallel:
            return RowSplit(size, group.rank(), group)
        return RowSplit(1, 0, group)

    @property
    def tp_size(self) -> int:
        return 1 if self.group is None else self.group.size()

    def slice_rows(self, rows: int) -> int:
        """Rows of one slice, given the rows of all slices."""
        if rows % self.slices:
            raise ValueError(f"{rows} rows do not split into {self.slices} equal slices")
        return rows // self.slices

    def own(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of an all-rows tensor (a view)."""
        n = self.slice_rows(t.shape[dim])
        return t.narrow(dim, self.rank * n, n)

    def rows_of(self, s0: int, s1: int, slice_len: int) -> list[tuple[int, int]]:
        """Rows ``s0:s1`` of every slice, in all-rows coordinates (slice order)."""
        return [(j * slice_len + s0, j * slice_len + s1) for j in range(self.slices)]

    @torch.no_grad()
    def gather_rows(self, t_BNX: torch.Tensor) -> torch.Tensor:
        """Every slice's rows from this rank's (dim 1; no gradient: top-k indices)."""
        if self.slices == 1:
            return t_BNX
        t_NBX = t_BNX.transpose(0, 1).contiguous()
        out = t_NBX.new_empty((self.slices * t_NBX.shape[0], *t_NBX.shape[1:]))
        dist.all_gather_into_tensor(out, t_NBX, group=self.group)
        return out.transpose(0, 1)

    def reduce(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum of ``parts[rank]`` over the TP group, returned on this rank.

        ``parts[j]``: this rank's partial for slice ``j`` (one per slice, identical shapes on
        every rank; widths may differ between slices). ``parts[rank]`` is reduced in place.
        """
        if len(parts) != self.slices:
            raise ValueError(f"{len(parts)} partials for {self.slices} slice(s)")
        own = parts[self.rank]
        if self.tp_size == 1:
            return own
        if self.slices == 1:
            dist.all_reduce(own, group=self.group)
            return own
        buffer = _stacked(parts)
        if buffer is not None:  # equal widths, one buffer: one reduce-scatter
            # gloo checks shapes: [slices, n] in, [1, n] out.
            out = own.view(1, -1)
            dist.reduce_scatter_tensor(out, buffer.view(self.slices, -1), group=self.group)
            return own
        for j, part in enumerate(parts):
            if part.numel():  # every rank skips the same (empty) slices
                dst = dist.get_global_rank(self.group, j)
                dist.reduce(part, dst=dst, group=self.group)
        return own

    def reduced_rows(
        self, partial_fn: Callable[[int, int], torch.Tensor], s0: int, s1: int, slice_len: int
    ) -> torch.Tensor:
        """The TP sum of ``partial_fn`` for this rank's rows ``s0:s1``.

        ``partial_fn(a0, a1)`` is this rank's partial for all-rows ``a0:a1``; it is called for
        rows ``s0:s1`` of every slice and the results reduced (``[B, s1-s0, X]`` each).
        """
        parts = [partial_fn(a0, a1) for a0, a1 in self.rows_of(s0, s1, slice_len)]
        if len(parts) > 1 and _stacked(parts) is None and _same_shape(parts):
            parts = list(torch.stack(parts))  # one buffer: one reduce-scatter
        return self.reduce(parts)


def _same_shape(parts: Sequence[torch.Tensor]) -> bool:
    return all(p.shape == parts[0].shape for p in parts)


def _stacked(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The ``[slices, ...]`` buffer when ``parts`` are its consecutive contiguous rows."""
    first = parts[0]
    if not first.numel() or not _same_shape(parts) or not all(p.is_contiguous() for p in parts):
        return None
    step = first.numel() * first.element_size()
    if any(p.data_ptr() != first.data_ptr() + j * step for j, p in enumerate(parts)):
        return None
    return first.as_strided((len(parts), *first.shape), (first.numel(), *first.stride()))
