"""Named model configs (HF ``config.json`` dicts) for experiments, tools and benchmarks.

Real models come from their checkpoint's ``config.json`` (``model.hf_path``); these presets are
for sizing (dry runs, pipeline layouts) and for the toy / bench models that have no checkpoint.
``glm5`` / ``deepseek-v3.2`` are transformers 5.17's ``GlmMoeDsaConfig()`` /
``DeepseekV32Config()`` defaults (the released shapes) plus one MTP layer; DeepSeek-V3.2 uses
its released YaRN RoPE.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from indexcache_train.model.toy_configs import TOY_SIZES, dsv32_toy_hf_config, glm5_toy_hf_config

DSV32_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

#: GLM-5-shaped bench model (issue #12): hidden 2048, 16 layers, 16 heads, GLM-5 MLA dims,
#: indexer 32x128, k 2048, dense MLPs (MoE off so one GPU measures attention, not routing).
BENCH_GLM5 = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "intermediate_size": 5632,
    "first_k_dense_replace": 16,
    "n_routed_experts": 8,
    "moe_intermediate_size": 512,
    "vocab_size": 50304,
    "index_topk": 2048,
}


def _glm5(mtp: int = 1, **kw: Any) -> dict[str, Any]:
    from transformers import GlmMoeDsaConfig

    d = GlmMoeDsaConfig(**kw).to_dict()
    d["num_nextn_predict_layers"] = mtp
    return d


def _dsv32(**kw: Any) -> dict[str, Any]:
    from transformers import DeepseekV32Config

    d = DeepseekV32Config(rope_parameters=dict(DSV32_YARN), **kw).to_dict()
    d["num_nextn_predict_layers"] = 1
    return d


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "glm5": lambda: _glm5(index_topk_freq=1, index_skip_topk_offset=1),
    "glm5.2": lambda: _glm5(index_topk_freq=4, index_skip_topk_offset=3),
    "deepseek-v3.2": lambda: _dsv32(),
    "glm5_toy": lambda: glm5_toy_hf_config(),
    "dsv32_toy": lambda: dsv32_toy_hf_config(),
    "bench_glm5": lambda: _glm5(mtp=0, **BENCH_GLM5),
}


def preset_hf_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise KeyError(
            f"unknown model preset {name!r}; choose one of {sorted(PRESETS)} or set model.hf_path"
        )
    return PRESETS[name]()


__all__ = ["BENCH_GLM5", "PRESETS", "TOY_SIZES", "preset_hf_config"]
