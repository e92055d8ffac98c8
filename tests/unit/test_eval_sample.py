"""Evaluation's sampled rows (loss/eval_sample.py): one position per block, fixed, and the same
positions at every layout whose row slices align with the blocks."""

from __future__ import annotations

import pytest
import torch

from indexcache_train.loss.eval_sample import MeasuredRows, sampled_positions, stratified_rows
from indexcache_train.parallel.context_parallel import zigzag_positions


def test_one_position_per_block_fixed() -> None:
    total, count = 8192, 1024
    mask = sampled_positions(torch.arange(total), total, count)
    assert mask.view(count, total // count).sum(1).eq(1).all()
    again = sampled_positions(torch.arange(total), total, count)
    assert torch.equal(mask, again)  # the same at every evaluation
    offsets = mask.view(count, -1).float().argmax(1)
    assert offsets.unique().numel() > 1  # offsets vary between blocks (no aliasing stride)


def _measured_positions(total: int, eval_rows: int, tp: int, cp: int) -> list[int]:
    """Global positions measured by every rank of a TP x CP layout (SP slices of CP rows)."""
    out = []
    for c in range(cp):
        positions_S = zigzag_positions(total, cp, c) if cp > 1 else torch.arange(total)
        for t in range(tp):
            m = MeasuredRows.build(eval_rows, positions_S, total, tp, t)
            n = positions_S.shape[0] // tp
            own = torch.arange(n) if m.own_N is None else m.own_N
            assert m.all_S is None or m.all_S.numel() == tp * own.numel()  # equal per slice
            out += positions_S[t * n + own].tolist()
    return sorted(out)


@pytest.mark.parametrize("tp,cp", [(2, 1), (4, 1), (1, 2), (2, 2), (4, 2)])
def test_same_positions_at_every_layout(tp: int, cp: int) -> None:
    one = _measured_positions(256, 32, 1, 1)
    assert len(one) == 32
    assert _measured_positions(256, 32, tp, cp) == one


def test_all_rows_when_the_sample_would_not_be_smaller() -> None:
    pos = torch.arange(64)
    for eval_rows in (0, 64, 100):
        m = MeasuredRows.build(eval_rows, pos, 64, 1, 0)
        assert m.own_N is None and m.count(64) == 64
        t = torch.randn(2, 64, 3)
        assert m.rows(t) is t and m.own(t) is t


def test_unaligned_blocks_fall_back_to_equal_counts_per_slice() -> None:
    # Blocks of 8 across slices of 30, blocks of 7 across slices of 10: a slice may hold more
    # sampled positions than another, and the TP reduction needs equal counts.
    for total, eval_rows, tp in [(60, 7, 2), (30, 4, 3)]:
        pos = torch.arange(total)
        counts = set()
        for t in range(tp):
            m = MeasuredRows.build(eval_rows, pos, total, tp, t)
            counts.add(m.count(total // tp))
            assert m.all_S.numel() == tp * m.count(total // tp)
        assert len(counts) == 1


def test_stratified_rows_one_per_stratum() -> None:
    rows = stratified_rows(100, 7)
    bounds = torch.div(torch.arange(8) * 100, 7, rounding_mode="floor")
    assert ((rows >= bounds[:-1]) & (rows < bounds[1:])).all()
