"""Per-layer Megatron ``ModuleSpec``s for GLM-5 / DeepSeek-V3.2-shaped DSA models.

Each trunk layer gets its own spec (a ``TransformerBlockSubmodules`` list), because layers differ:
the first ``first_k_dense_replace`` layers have a dense MLP and the rest MoE; Full layers carry an
indexer spec and Shared layers none (so they hold no indexer parameters at all). MTP depth ``k``
is built from the spec of global layer ``num_layers + k``.

Backend seam: specs take their building blocks from a :class:`Backend`. Only :data:`LOCAL` (torch
and Megatron's local tensor-parallel modules) ships, because it is the only one our machines can
run and test; a Transformer Engine backend would implement the same attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayerSubmodules,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from indexcache_train.compat import DuplicatedLinear, LayerNorm, RMSNorm
from indexcache_train.model.attention import (
    DSACoreAttention,
    DSACoreAttentionSubmodules,
    DSASelfAttention,
    DSASelfAttentionSubmodules,
)
from indexcache_train.model.config import ModelConfig
from indexcache_train.model.dims import MLADims
from indexcache_train.model.grouped_experts import GroupedExperts
from indexcache_train.model.indexer import IndexerSubmodules, LightningIndexer
from indexcache_train.model.layers import DSAMultiTokenPredictionLayer, DSATransformerLayer


@dataclass(frozen=True)
class Backend:
    """Module classes a spec is built from (the seam for accelerated backends)."""

    name: str
    column_parallel_linear: type
    row_parallel_linear: type
    #: Replicated on every TP rank (DSA down projections and indexer projections).
    duplicated_linear: type
    rms_norm: type
    layer_norm: type
    experts: Any


#: The routed experts' MLP (fc1 column-, fc2 row-parallel), shared by both expert modules.
EXPERT_MLP = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
LOCAL = Backend(
    name="local",
    column_parallel_linear=ColumnParallelLinear,
    row_parallel_linear=RowParallelLinear,
    duplicated_linear=DuplicatedLinear,
    rms_norm=RMSNorm,
    layer_norm=LayerNorm,
    experts=partial(SequentialMLP, submodules=EXPERT_MLP),
)
#: LOCAL with the routed experts as grouped GEMMs (``model.moe_grouped_gemm``; same checkpoints).
LOCAL_GROUPED = replace(
    LOCAL, name="local_grouped", experts=partial(GroupedExperts, submodules=EXPERT_MLP)
)


def _mlp_builder(cfg: ModelConfig, index: int, backend: Backend) -> Any:
    mlp = MLPSubmodules(
        linear_fc1=backend.column_parallel_linear, linear_fc2=backend.row_parallel_linear
    )
    if not cfg.is_moe_layer(index):
        return partial(MLP.as_mlp_submodule, submodules=mlp)
    shared = partial(SharedExpertMLP, submodules=mlp)
    return partial(
        MoELayer, submodules=MoESubmodules(experts=backend.experts, shared_experts=shared)
    )


def attention_spec(
    cfg: ModelConfig,
    index: int,
    backend: Backend = LOCAL,
    kernel_backend: str = "auto",
    explicit_index: bool = False,
) -> ModuleSpec:
    """The DSA self-attention of global layer ``index`` (Full: with indexer; Shared: without)."""
    dims = MLADims.from_model_config(cfg)
    indexer = (
        ModuleSpec(
            module=LightningIndexer,
            submodules=IndexerSubmodules(
                linear_wq_b=backend.duplicated_linear,
                linear_wk=backend.duplicated_linear,
                k_norm=backend.layer_norm,
                linear_weights_proj=backend.duplicated_linear,
            ),
        )
        if cfg.schedule.is_full(index)
        else None
    )
    # attn_mask_type only documents causality (Megatron's MTP layer checks it); masking itself
    # comes from DSAForwardState.key_range.
    params: dict[str, Any] = {
        "dims": dims,
        "schedule": cfg.schedule,
        "kernel_backend": kernel_backend,
        "attn_mask_type": AttnMaskType.causal,
    }
    if explicit_index:
        params["layer_index"] = index
    return ModuleSpec(
        module=DSASelfAttention,
        params=params,
        submodules=DSASelfAttentionSubmodules(
            linear_q_down_proj=backend.duplicated_linear,
            q_layernorm=backend.rms_norm,
            linear_q_up_proj=backend.column_parallel_linear,
            linear_kv_down_proj=backend.duplicated_linear,
            kv_layernorm=backend.rms_norm,
            linear_kv_up_proj=backend.column_parallel_linear,
            core_attention=ModuleSpec(
                module=DSACoreAttention, submodules=DSACoreAttentionSubmodules(indexer)
            ),
            linear_proj=backend.row_parallel_linear,
        ),
    )


def layer_spec(
    cfg: ModelConfig, index: int, backend: Backend = LOCAL, kernel_backend: str = "auto"
) -> ModuleSpec:
    """Spec of global layer ``index`` (trunk ``0..N-1`` or MTP ``N+k``)."""
    return ModuleSpec(
        module=DSATransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=backend.rms_norm,
            self_attention=attention_spec(
                cfg, index, backend, kernel_backend, explicit_index=index >= cfg.num_layers
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=backend.rms_norm,
            mlp=_mlp_builder(cfg, index, backend),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def decoder_block_spec(
    cfg: ModelConfig, layers: range, backend: Backend = LOCAL, kernel_backend: str = "auto"
) -> TransformerBlockSubmodules:
    """Specs of the trunk layers this pipeline stage builds (``layers``: global indices)."""
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec(cfg, i, backend, kernel_backend) for i in layers],
        layer_norm=backend.rms_norm,
    )


def mtp_block_spec(
    cfg: ModelConfig, backend: Backend = LOCAL, kernel_backend: str = "auto"
) -> MultiTokenPredictionBlockSubmodules | None:
    if cfg.num_mtp_layers == 0:
        return None
    specs = [
        ModuleSpec(
            module=DSAMultiTokenPredictionLayer,
            submodules=MultiTokenPredictionLayerSubmodules(
                enorm=backend.rms_norm,
                hnorm=backend.rms_norm,
                eh_proj=backend.column_parallel_linear,
                mtp_model_layer=layer_spec(cfg, cfg.num_layers + k, backend, kernel_backend),
                layer_norm=backend.rms_norm,
            ),
        )
        for k in range(cfg.num_mtp_layers)
    ]
    return MultiTokenPredictionBlockSubmodules(layer_specs=specs)
