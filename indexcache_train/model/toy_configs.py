"""Tiny GLM-5 / DeepSeek-V3.2 configs for tests, the demo and CPU experiments.

They are the transformers 5.17 ``GlmMoeDsaConfig()`` / ``DeepseekV32Config()`` defaults with only
sizes shrunk: ``rope_parameters``, ``n_group``, ``topk_group``, ``routed_scaling_factor``,
``norm_topk_prob`` and eps values keep their real values, so toys exercise the real code paths.
"""

from __future__ import annotations

from typing import Any

TOY_SIZES: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 16,
    "kv_lora_rank": 32,
    "q_lora_rank": 48,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "index_topk": 8,
    "index_head_dim": 16,
    "index_n_heads": 4,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 4096,
}


def _hf_dict(config: Any, num_mtp_layers: int) -> dict[str, Any]:
    d = config.to_dict()
    d["num_nextn_predict_layers"] = num_mtp_layers
    return d


def glm5_toy_hf_config(num_mtp_layers: int = 1, **overrides: Any) -> dict[str, Any]:
    """``GlmMoeDsaConfig`` defaults, sizes shrunk; schedule keys via ``overrides``."""
    from transformers import GlmMoeDsaConfig

    return _hf_dict(GlmMoeDsaConfig(**{**TOY_SIZES, **overrides}), num_mtp_layers)


def dsv32_toy_hf_config(num_mtp_layers: int = 1, **overrides: Any) -> dict[str, Any]:
    """``DeepseekV32Config`` defaults (n_group 8 / topk_group 4 / top-8 routing), sizes shrunk."""
    from transformers import DeepseekV32Config

    return _hf_dict(
        DeepseekV32Config(**{**TOY_SIZES, "index_n_heads": 4, **overrides}), num_mtp_layers
    )
