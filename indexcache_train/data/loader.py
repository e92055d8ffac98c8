"""Deterministic, resumable micro-batch loading (Megatron's "single" sampler, re-implemented).

The order of samples is fixed by the dataset itself: Megatron's ``GPTDataset`` already applies
a seeded shuffle, so index ``i`` is the ``i``-th sample of the run. The sampler walks indices
sequentially: global micro-step ``m`` covers indices ``[m * M * D, (m + 1) * M * D)`` for
micro-batch size ``M`` and data-parallel size ``D``, and DP rank ``r`` takes the ``r``-th slice of
``M``. Resuming therefore only needs ``consumed_samples`` (the global count, summed over DP
ranks, that the trainer checkpoints): starting at it yields exactly the micro-batches an
uninterrupted run would have produced next, with any number of DataLoader workers (the
DataLoader returns batches in sampler order).

Megatron-LM's sampler lives in ``megatron.training``, which needs its global ``args``; this is
the same walk without that dependency.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["MicroBatchSampler", "build_dataloader"]


class MicroBatchSampler:
    """Yields this DP rank's index lists, micro-batch by micro-batch, from ``consumed_samples``.

    The last incomplete global micro-step is dropped, as Megatron does, so every DP rank yields
    the same number of micro-batches.

    Args:
        total_samples: Length of the dataset.
        consumed_samples: Samples already consumed by all DP ranks together; a multiple of
            ``micro_batch_size * data_parallel_size``.
        micro_batch_size: Samples per micro-batch per rank.
        data_parallel_rank: This rank's index in its data-parallel group.
        data_parallel_size: Size of the data-parallel group.

    Raises:
        ValueError: Inconsistent sizes; the message says which and why.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
    ) -> None:
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise ValueError(
                f"micro_batch_size ({micro_batch_size}) and data_parallel_size "
                f"({data_parallel_size}) must be >= 1"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})"
            )
        self.step = micro_batch_size * data_parallel_size
        if consumed_samples < 0 or consumed_samples % self.step:
            raise ValueError(
                f"consumed_samples={consumed_samples} must be a non-negative multiple of "
                f"micro_batch_size * data_parallel_size = {self.step}; resume from the count the "
                "trainer checkpointed at a step boundary"
            )
        if consumed_samples > total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} exceeds the dataset's {total_samples} "
                "samples; build the datasets with train_samples covering the whole run"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.offset = data_parallel_rank * micro_batch_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.step

    def __iter__(self) -> Iterator[list[int]]:
        for base in range(self.consumed_samples, self.total_samples - self.step + 1, self.step):
            start = base + self.offset
            yield list(range(start, start + self.micro_batch_size))


def build_dataloader(
    ds: Dataset | None,
    micro_batch_size: int,
    consumed_samples: int,
    *,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool | None = None,
) -> DataLoader | None:
    """A DataLoader over ``ds`` that resumes exactly at ``consumed_samples``.

    Batches are dicts of stacked tensors (``tokens``, ``labels``: int64 ``[M, S]``;
    ``loss_mask``: float32 ``[M, S]``; ``position_ids``: int64 ``[M, S]``).

    Args:
        ds: A dataset from :func:`~indexcache_train.data.builder.build_datasets` (None passes
            through, for ranks that build no dataset).
        micro_batch_size: Samples per micro-batch on this rank.
        consumed_samples: Global samples already consumed (0 for a fresh run).
        data_parallel_rank: This rank's data-parallel index.
        data_parallel_size: Data-parallel world size.
        num_workers: Worker processes (the order of batches does not depend on it).
        pin_memory: Pin host memory for faster H2D copies; None: only when CUDA is available.

    Returns:
        The DataLoader, or None when ``ds`` is None.
    """
    if ds is None:
        return None
    assert isinstance(ds, Sized), "the dataset must define __len__"
    sampler = MicroBatchSampler(
        len(ds), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size
    )
    return DataLoader(
        ds,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        # A validation loader is iterated again at every evaluation (restarting at
        # consumed_samples); persistent workers avoid re-forking them each time.
        persistent_workers=num_workers > 0,
    )
