"""Tiny GLM-5 / DeepSeek-V3.2 configs for tests, the demo and CPU experiments.

Shortcuts for the family records' toy factory (:meth:`ModelFamily.toy_hf_config`): the
transformers 5.17 ``GlmMoeDsaConfig()`` / ``DeepseekV32Config()`` defaults with only sizes
shrunk (:data:`~indexcache_train.model.families.TOY_SIZES`), so toys exercise the real code paths.
"""

from __future__ import annotations

from typing import Any

from indexcache_train.model.families import DEEPSEEK_V32, GLM_MOE_DSA, TOY_SIZES


def glm5_toy_hf_config(num_mtp_layers: int = 1, **overrides: Any) -> dict[str, Any]:
    """``GlmMoeDsaConfig`` defaults, sizes shrunk; schedule keys via ``overrides``."""
    return GLM_MOE_DSA.toy_hf_config(num_mtp_layers, **overrides)


def dsv32_toy_hf_config(num_mtp_layers: int = 1, **overrides: Any) -> dict[str, Any]:
    """``DeepseekV32Config`` defaults (n_group 8 / topk_group 4 / top-8 routing), sizes shrunk."""
    return DEEPSEEK_V32.toy_hf_config(num_mtp_layers, **overrides)


__all__ = ["TOY_SIZES", "dsv32_toy_hf_config", "glm5_toy_hf_config"]
