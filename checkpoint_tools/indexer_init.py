"""Fresh lightning-indexer weights, initialised the way transformers initialises a new model.

transformers 5.17 ``PreTrainedModel._init_weights``: ``nn.Linear`` weights ~ normal(0,
``initializer_range``) (``wq_b``, ``wk``, ``weights_proj``; none has a bias), ``nn.LayerNorm``
weight = 1 and bias = 0 (``k_norm``). Each tensor draws from its own generator seeded by
``(seed, tensor name)``, so the result does not depend on the order tensors are written in.

Dtypes: ``weights_proj`` is fp32 (as in the HF releases and ``_keep_in_fp32_modules``); the
others take the dtype the checkpoint's existing indexers use, else the config dtype (bf16 when
the config names none). A fresh indexer is never FP8: there is nothing to quantise from.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from checkpoint_tools.layout import INDEXER_PART, indexer_tensors
from checkpoint_tools.safetensors_format import TensorSpec, torch_dtype
from indexcache_train.model.families import ModelFamily
from indexcache_train.model.tensor_rules import ONES, ZEROS, CheckpointDims

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class FreshTensor:
    """A tensor to create: its layout and how to fill it."""

    spec: TensorSpec
    kind: str
    std: float


def fresh_indexer(
    dims: CheckpointDims,
    family: ModelFamily,
    layer: int,
    *,
    std: float,
    default_dtype: str,
    template_dtypes: Mapping[str, str] | None = None,
) -> list[FreshTensor]:
    """The five tensors of a new indexer on ``layer``.

    Args:
        dims: model sizes (index_head_dim / index_n_heads / q_lora_rank must be set).
        family: the model family (its tensor table names the indexer's tensors).
        layer: global layer index.
        std: ``initializer_range``.
        default_dtype: safetensors dtype for non-fp32 tensors without a template.
        template_dtypes: tensor suffix (e.g. ``"wk.weight"``) -> dtype of an existing indexer.
    """
    out = []
    for expected in indexer_tensors(dims, family, layer):
        suffix = expected.name.split(INDEXER_PART, 1)[1]
        dtype = (template_dtypes or {}).get(suffix)
        if dtype is None or dtype.startswith("F8"):
            dtype = "F32" if expected.keep_fp32 else default_dtype
        out.append(
            FreshTensor(TensorSpec(expected.name, dtype, expected.shape), expected.init, std)
        )
    return out


def materialise(fresh: FreshTensor, seed: int) -> torch.Tensor:
    """Create the tensor (sampled in fp32, then cast, so every dtype sees the same draws)."""
    import torch

    spec = fresh.spec
    if fresh.kind == ONES:
        values = torch.ones(spec.shape)
    elif fresh.kind == ZEROS:
        values = torch.zeros(spec.shape)
    else:
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{spec.name}".encode()))
        values = torch.empty(spec.shape).normal_(0.0, fresh.std, generator=gen)
    return values.to(torch_dtype(spec.dtype))
