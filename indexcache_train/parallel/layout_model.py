"""A pipeline layout as global layer indices per model chunk, and the per-layer cost model.

Pure Python (no torch, no Megatron) so the pipeline guard runs before anything is built.

Vocabulary (Megatron-Core 0.19.2): ``pipeline_model_parallel_size`` (pp) ranks, each holding
``virtual_pipeline_model_parallel_size`` (vpp) model chunks. Chunks are kept in Megatron's flattened
order, the order the layers run in: chunk ``c`` is virtual stage ``c // pp`` of pipeline rank
``c % pp``. The embedding always sits on chunk 0 and the loss on the last chunk (Megatron requires
both); MTP layers sit in one chunk after every trunk layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cached_property

from indexcache_train.parallel.layout_format import DECODER, EMBEDDING, LOSS, MTP, format_layout
from indexcache_train.schedule import IndexCacheSchedule


class PipelineLayoutError(ValueError):
    """A pipeline layout that cannot be built; the message names the layers and the fix."""


@dataclass(frozen=True)
class LayerCosts:
    """Relative cost (forward + backward time) of what a pipeline chunk runs; one MoE layer = 1.

    The defaults are rough FLOP ratios for GLM-5 at long context (the indexer is ~29% of a layer's
    forward FLOPs at 128K, less at shorter context); measure and override for real runs.

    Attributes:
        moe_layer: A transformer layer with an MoE MLP (attention included, indexer excluded).
        dense_layer: A transformer layer with a dense MLP; layers ``< first_k_dense_replace``.
        indexer: Extra for a Full layer: its lightning indexer and top-k. Shared layers skip it.
        embedding: The input embedding, always on the first chunk.
        loss: Output layer plus cross entropy, always on the last chunk.
        mtp_extra: Extra per MTP depth on top of its transformer layer: ``eh_proj``, norms and
            its own output layer and loss.
        first_k_dense_replace: HF's key: global layer indices below it have a dense MLP.
    """

    moe_layer: float = 1.0
    dense_layer: float = 0.8
    indexer: float = 0.25
    embedding: float = 0.1
    loss: float = 1.5
    mtp_extra: float = 1.7
    first_k_dense_replace: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PipelineLayoutError(f"LayerCosts.{f.name} must be a number, got {value!r}.")
            if not math.isfinite(value) or value < 0:
                raise PipelineLayoutError(
                    f"LayerCosts.{f.name}={value} is invalid; costs must be finite and >= 0."
                )
        if not isinstance(self.first_k_dense_replace, int):
            raise PipelineLayoutError(
                f"LayerCosts.first_k_dense_replace must be an integer, "
                f"got {self.first_k_dense_replace!r}."
            )

    def layer(self, schedule: IndexCacheSchedule, index: int) -> float:
        """Cost of global layer ``index`` (trunk or MTP) under ``schedule``."""
        cost = self.dense_layer if index < self.first_k_dense_replace else self.moe_layer
        if schedule.is_full(index):
            cost += self.indexer
        if schedule.is_mtp(index):
            cost += self.mtp_extra
        return cost


@dataclass(frozen=True)
class PipelineLayout:
    """Which global layers each model chunk builds.

    Attributes:
        chunks: Global layer indices per chunk, in Megatron's flattened order (see module doc).
        pipeline_model_parallel_size: Number of pipeline ranks (pp).
        num_layers: Trunk layers; indices ``>= num_layers`` are MTP layers.
    """

    chunks: tuple[tuple[int, ...], ...]
    pipeline_model_parallel_size: int
    num_layers: int

    def __post_init__(self) -> None:
        pp = self.pipeline_model_parallel_size
        if pp < 1 or not self.chunks or len(self.chunks) % pp:
            raise PipelineLayoutError(
                f"{len(self.chunks)} model chunks cannot be spread over "
                f"pipeline_model_parallel_size={pp}; the chunk count must be a positive multiple "
                "of it (one chunk per rank and virtual stage)."
            )
        flat = [i for chunk in self.chunks for i in chunk]
        if flat != list(range(len(flat))) or len(flat) < self.num_layers:
            raise PipelineLayoutError(
                "layout chunks must list every layer once, in order (trunk layers, then MTP)."
            )

    @property
    def virtual_pipeline_model_parallel_size(self) -> int:
        """Chunks per pipeline rank (1 without virtual pipelining)."""
        return len(self.chunks) // self.pipeline_model_parallel_size

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    def chunk_name(self, chunk: int) -> str:
        """Human name: ``pipeline stage 3`` or ``pipeline stage 3 / virtual stage 1``."""
        pp = self.pipeline_model_parallel_size
        name = f"pipeline stage {chunk % pp}"
        if self.virtual_pipeline_model_parallel_size > 1:
            name += f" / virtual stage {chunk // pp}"
        return name

    def chunk_of(self, layer: int) -> int:
        """Index (flattened order) of the chunk that builds global layer ``layer``."""
        return self._owner[layer]

    @cached_property
    def _owner(self) -> dict[int, int]:
        return {i: c for c, chunk in enumerate(self.chunks) for i in chunk}

    def to_megatron(self) -> str:
        """This layout as a ``pipeline_model_parallel_layout`` string (``E``, ``t``, ``m``, ``L``)."""
        last = self.num_chunks - 1
        rows = []
        for c, chunk in enumerate(self.chunks):
            trunk = sum(1 for i in chunk if i < self.num_layers)
            row = EMBEDDING if c == 0 else ""
            row += DECODER * trunk + MTP * (len(chunk) - trunk)
            rows.append(row + (LOSS if c == last else ""))
        return format_layout(rows)

    def chunk_costs(self, schedule: IndexCacheSchedule, costs: LayerCosts) -> list[float]:
        """Cost of each chunk: its layers, plus the embedding (first) and the loss (last)."""
        out = [sum(costs.layer(schedule, i) for i in chunk) for chunk in self.chunks]
        out[0] += costs.embedding
        out[-1] += costs.loss
        return out


def layer_name(schedule: IndexCacheSchedule, index: int) -> str:
    """``layer 20`` for trunk layers, ``MTP layer 78`` for MTP layers (global index)."""
    return f"MTP layer {index}" if schedule.is_mtp(index) else f"layer {index}"


def chunks_from_sizes(
    sizes: Sequence[int], num_layers: int, num_mtp_layers: int
) -> tuple[tuple[int, ...], ...]:
    """Consecutive trunk layers per chunk from chunk sizes; every MTP layer goes in the last chunk.

    That is where Megatron puts MTP when no ``pipeline_model_parallel_layout`` is given.
    """
    chunks, start = [], 0
    for size in sizes:
        chunks.append(tuple(range(start, start + size)))
        start += size
    chunks[-1] += tuple(range(num_layers, num_layers + num_mtp_layers))
    return tuple(chunks)
