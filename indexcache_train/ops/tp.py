"""Tensor-parallel sums of per-rank head partials: the only collective the operators issue.

Each TP rank holds a slice of the attention heads, so a head-summed distillation target is a
partial sum on every rank until it is summed over the TP group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def tp_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in the tensor-parallel group (1 without one)."""
    return 1 if group is None else group.size()


def tp_sum(p: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """In-place sum over the tensor-parallel ranks (each holds a slice of the heads)."""
    if tp_size(group) > 1:
        dist.all_reduce(p, group=group)
    return p
