"""Which query rows an evaluation measures: a fixed, stratified sample, so cost stays bounded.

Recall needs each measured row's attention over *all* keys (O(rows x S x H x D), no kernel),
and the per-pair KL a distillation term per served layer: over every row both grow as S^2 and
at 128K an evaluation would cost far more than a training step. Both are means over rows, so
evaluation measures a sample of rows instead, stratified over positions: the sequence is cut
into ``count`` blocks of consecutive positions and one position per block is measured, at an
offset drawn once from a fixed seed. The sample is a set of positions: the same at every
evaluation (comparable across steps) and, when the blocks align with the layout's row slices,
on every layout; the estimate is the stratified mean (unbiased for equal blocks). Measured
error against all rows at 8K: docs/design.md, "The multi-layer distillation loss".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from indexcache_train.ops.masking import KeyRange

SEED = 20260312


def stratified_rows(rows: int, count: int, seed: int = SEED) -> torch.Tensor:
    """``count`` sorted offsets in ``[0, rows)``, one per equal stratum (int64)."""
    bounds = torch.div(torch.arange(count + 1) * rows, count, rounding_mode="floor")
    u = torch.rand(count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    width = bounds[1:] - bounds[:-1]
    return bounds[:-1] + (u * width).long().clamp(max=width - 1)


def sampled_positions(positions: torch.Tensor, total: int, count: int) -> torch.Tensor:
    """Whether each of ``positions`` (in ``[0, total)``) is measured: one position per block of
    ``L = total // count`` consecutive positions, at an offset drawn once from a fixed seed."""
    L = max(1, total // max(count, 1))
    g = torch.Generator().manual_seed(SEED)
    offsets = torch.randint(L, (total // L + 1,), generator=g).to(positions.device)
    return positions % L == offsets[positions // L]


@dataclass(frozen=True)
class MeasuredRows:
    """The measured rows: ``own_N`` indices into this rank's own rows (``None``: all of them),
    ``all_S`` those of every sequence-parallel slice in the attention's rows (slice-major)."""

    own_N: torch.Tensor | None = None
    all_S: torch.Tensor | None = None

    @staticmethod
    def build(eval_rows: int, positions_S: torch.Tensor, total: int, slices: int, rank: int):
        """About ``eval_rows`` rows per sequence (0: all) of the attention's rows, whose global
        positions are ``positions_S``. The sample is a set of *positions*, so every layout
        (TP, SP, CP) measures the same rows whenever each slice holds the same number of them
        (block boundaries aligned with the slices: powers of two); otherwise each slice takes
        its own stratified sample of equal size (the reduction over TP needs equal counts)."""
        S = positions_S.shape[0]
        if eval_rows <= 0 or eval_rows >= total:
            return MeasuredRows()
        n = S // slices
        mask_JN = sampled_positions(positions_S, total, eval_rows).view(slices, n)
        counts = mask_JN.sum(1)
        if not bool((counts == counts[0]).all()):
            per_slice = math.ceil(eval_rows * S / total / slices)
            own = stratified_rows(n, min(per_slice, n)).to(positions_S.device)
            mask_JN = torch.zeros_like(mask_JN)
            mask_JN[:, own] = True
        all_rows = mask_JN.reshape(-1).nonzero().squeeze(1)
        return MeasuredRows(mask_JN[rank].nonzero().squeeze(1), all_rows)

    def count(self, own_rows: int) -> int:
        return own_rows if self.own_N is None else len(self.own_N)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """Measured rows (dim 1) of an every-row tensor (the attention's)."""
        return t if self.all_S is None else t.index_select(1, self.all_S)

    def own(self, t: torch.Tensor) -> torch.Tensor:
        """Measured rows (dim 1) of an own-rows tensor (the indexer's)."""
        return t if self.own_N is None else t.index_select(1, self.own_N)

    def key_range(self, key_range: KeyRange) -> KeyRange:
        if self.all_S is None:
            return key_range
        return KeyRange(self.rows(key_range.query_index_BS), self.rows(key_range.key_start_BS))
