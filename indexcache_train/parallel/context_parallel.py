"""Context parallelism for DSA attention: zigzag split, global positions, key all-gather.

Megatron's load-balanced (zigzag) split cuts the sequence into ``2 * cp`` chunks; rank ``r``
holds chunks ``r`` and ``2cp-1-r`` (causal work is then equal on every rank). Queries stay local;
every attention-like operation (sparse MLA, dense warm-up attention, the indexer) needs the keys of
the *whole* sequence in natural order, so keys are all-gathered over the CP group and un-zigzagged.
The all-gather's backward is a reduce-scatter, so each rank receives the gradient that every
rank's queries sent to its keys. Top-k indices are global key positions, shared unchanged by
Shared layers on the same rank.

Packed documents need nothing extra: the whole packed stream is split this way and each query
keeps ``[key_start, query_index]`` in stream coordinates (see :mod:`indexcache_train.data.packing`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def zigzag_positions(
    seq_len: int, cp: int, rank: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Global positions (natural order) of the rows rank ``rank`` holds, in its local order."""
    if seq_len % (2 * cp):
        raise ValueError(
            f"sequence length {seq_len} must be divisible by 2*context_parallel_size={2 * cp}"
        )
    c = seq_len // (2 * cp)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([first, second])


def gathered_to_natural(
    local_len: int, cp: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Index into the rank-ordered all-gather (rank 0's rows, rank 1's rows, ...) for each natural
    position: ``natural = gathered[index]``."""
    seq_len = local_len * cp
    order = torch.cat([zigzag_positions(seq_len, cp, r, device) for r in range(cp)])
    index = torch.empty_like(order)
    index[order] = torch.arange(seq_len, device=device)
    return index


def split_for_rank(t: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's zigzag rows of a full-sequence tensor (e.g. a ``[B, S]`` batch field)."""
    if cp == 1:
        return t
    pos = zigzag_positions(t.shape[dim], cp, rank, t.device)
    return t.index_select(dim, pos)


def gather_sequence(t_SX: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Whole-sequence tensor in natural order from this rank's zigzag rows (dim 0 = sequence)."""
    if group is None or dist.get_world_size(group) == 1:
        return t_SX
    # Megatron's sequence-parallel gather is group-agnostic: all-gather along dim 0 forward,
    # reduce-scatter (sum) of the gradient backward, which is what CP keys need.
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    cp = dist.get_world_size(group)
    gathered = gather_from_sequence_parallel_region(t_SX, group=group)
    return gathered.index_select(0, gathered_to_natural(t_SX.shape[0], cp, t_SX.device))
