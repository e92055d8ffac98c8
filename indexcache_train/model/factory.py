"""Build Megatron's ``TransformerConfig`` and the ``IndexCacheGPTModel`` from a :class:`ModelConfig`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from indexcache_train.loss.autoscaler import IndexCacheLossAutoScaler
from indexcache_train.model.config import ModelConfig
from indexcache_train.model.gpt import IndexCacheGPTModel
from indexcache_train.model.specs import LOCAL, Backend, decoder_block_spec, mtp_block_spec


@dataclass(frozen=True)
class ParallelSettings:
    """Megatron parallel / precision / recompute knobs the model is built with."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    pipeline_model_parallel_layout: str | None = None
    params_dtype: torch.dtype = torch.float32
    bf16: bool = False
    use_cpu_initialization: bool = True
    perform_initialization: bool = True
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    moe_token_dispatcher_type: str = "alltoall"
    moe_router_bias_update_rate: float = 1e-3
    moe_aux_loss_coeff: float = 0.0
    mtp_loss_scaling_factor: float = 0.1
    calculate_per_token_loss: bool = False


def transformer_config(
    cfg: ModelConfig, par: ParallelSettings = ParallelSettings()
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for the generic parts (MLP, MoE, MTP, parallelism)."""
    n, k = cfg.num_layers, cfg.first_k_dense_replace
    grouped = cfg.n_group > 1
    tcfg = TransformerConfig(
        num_layers=n,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        kv_channels=cfg.qk_head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.initializer_range,
        num_moe_experts=cfg.n_routed_experts,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_layer_freq=[0] * min(k, n) + [1] * max(n - k, 0),
        moe_router_topk=cfg.num_experts_per_tok,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=par.moe_router_bias_update_rate,
        moe_router_num_groups=cfg.n_group if grouped else None,
        moe_router_group_topk=cfg.topk_group if grouped else None,
        moe_router_topk_scaling_factor=cfg.routed_scaling_factor,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if par.moe_aux_loss_coeff else "none",
        moe_aux_loss_coeff=par.moe_aux_loss_coeff,
        moe_shared_expert_intermediate_size=cfg.moe_intermediate_size * cfg.n_shared_experts
        if cfg.n_shared_experts
        else None,
        moe_token_dispatcher_type=par.moe_token_dispatcher_type,
        mtp_num_layers=cfg.num_mtp_layers or None,
        mtp_loss_scaling_factor=par.mtp_loss_scaling_factor,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
        sequence_parallel=par.sequence_parallel,
        pipeline_model_parallel_layout=par.pipeline_model_parallel_layout,
        params_dtype=par.params_dtype,
        bf16=par.bf16,
        pipeline_dtype=par.params_dtype,
        use_cpu_initialization=par.use_cpu_initialization,
        perform_initialization=par.perform_initialization,
        recompute_granularity=par.recompute_granularity,
        recompute_method=par.recompute_method,
        recompute_num_layers=par.recompute_num_layers,
        calculate_per_token_loss=par.calculate_per_token_loss,
    )
    # Megatron's schedules call this hook with loss_scale * cp / num_microbatches each
    # micro-batch; our distillation terms use it, so they scale exactly like the LM loss.
    tcfg.experimental_attention_variant_loss_scale_func = IndexCacheLossAutoScaler.set_loss_scale
    return tcfg


def stage_layers(tcfg: TransformerConfig, pp_rank: int, vp_stage: int | None = None) -> range:
    """Global trunk layer indices built on pipeline rank ``pp_rank`` (virtual stage ``vp_stage``)."""
    offset = get_transformer_layer_offset(tcfg, vp_stage, pp_rank)
    return range(offset, offset + get_num_layers_to_build(tcfg, vp_stage, pp_rank))


def build_model(
    cfg: ModelConfig,
    tcfg: TransformerConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    pp_rank: int = 0,
    vp_stage: int | None = None,
    pg_collection: ProcessGroupCollection | None = None,
    backend: Backend = LOCAL,
    kernel_backend: str = "auto",
    max_sequence_length: int | None = None,
    lm_loss_chunk: int = 0,
) -> IndexCacheGPTModel:
    """One pipeline stage (or the whole model at PP=1) of the DSA GPT model."""
    layers = stage_layers(tcfg, pp_rank, vp_stage)
    return IndexCacheGPTModel(
        config=tcfg,
        decoder_spec=decoder_block_spec(cfg, layers, backend, kernel_backend),
        mtp_spec=mtp_block_spec(cfg, backend, kernel_backend) if post_process else None,
        vocab_size=cfg.vocab_size,
        max_sequence_length=max_sequence_length or cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        pg_collection=pg_collection or ProcessGroupCollection.use_mpu_process_groups(),
        vp_stage=vp_stage,
        lm_loss_chunk=lm_loss_chunk,
    )
