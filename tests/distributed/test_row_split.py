"""RowSplit's collectives on 2 gloo processes: the per-slice reduction (one
reduce-scatter for equal widths, one reduce per slice for ragged ones, empty slices skipped),
the all-reduce without sequence parallelism, and the row all-gather."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from indexcache_train.ops.row_split import RowSplit


def _partial(rank: int, slices: int, widths: list[int]) -> list[torch.Tensor]:
    """Rank ``rank``'s partial for each slice: a value that names (rank, slice, position)."""
    flat = torch.empty(sum(2 * w for w in widths))
    parts, off = [], 0
    for j, w in enumerate(widths):
        part = flat[off : off + 2 * w].view(1, 2, w)
        off += 2 * w
        part.copy_(torch.arange(2 * w, dtype=torch.float32).view(1, 2, w) + 100 * j + rank)
        parts.append(part)
    return parts


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        split = RowSplit.build(group, sequence_parallel=True)
        results = {}
        for name, widths in {
            "equal": [3] * world,  # one buffer, equal widths: reduce-scatter
            "ragged": [j + 1 for j in range(world)],  # one reduce per slice
            "empty_first": [0] + [2] * (world - 1),  # a slice no row of the chunk sees
        }.items():
            got = split.reduce(_partial(rank, world, widths))
            want = sum(_partial(r, world, widths)[rank] for r in range(world))
            results[name] = bool(torch.equal(got, want))
        no_sp = RowSplit.build(group, sequence_parallel=False)
        got = no_sp.reduce([torch.full((2,), float(rank))])
        results["all_reduce"] = bool(torch.equal(got, torch.full((2,), float(sum(range(world))))))
        t_BNX = torch.full((2, 3, 1), rank, dtype=torch.int32)
        gathered = split.gather_rows(t_BNX)
        want = torch.arange(world, dtype=torch.int32).repeat_interleave(3).view(1, -1, 1)
        results["gather_rows"] = bool(torch.equal(gathered, want.expand(2, -1, -1)))
        own = split.reduced_rows(lambda a0, a1: torch.full((1, a1 - a0, 2), float(a0)), 1, 3, 4)
        # rows 1..2 of every slice j start at 4j + 1: this rank's sum over ranks is world x that.
        results["reduced_rows"] = bool(
            torch.equal(own, torch.full((1, 2, 2), 4.0 * rank + 1) * world)
        )
        torch.save(results, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2])  # 4 ranks: the TP4+SP equivalence scenarios
def test_row_split_collectives(world: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        init = f"file://{os.path.join(d, 'store')}"
        out = os.path.join(d, "result")
        mp.start_processes(_worker, args=(world, init, out), nprocs=world, start_method="spawn")
        for rank in range(world):
            results = torch.load(f"{out}.{rank}")
            assert all(results.values()), (rank, results)


def test_row_split_refuses_bad_layouts() -> None:
    with pytest.raises(ValueError, match="outside"):
        RowSplit(2, 2)
    with pytest.raises(ValueError, match="process group"):
        RowSplit(2, 0, None)

    class TwoRanks:  # only its size is read
        def size(self) -> int:
            return 2

    with pytest.raises(ValueError, match="equal slices"):
        RowSplit(2, 0, TwoRanks()).slice_rows(5)
