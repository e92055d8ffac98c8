"""What the tools know per ``model_type``: DSA or dense MLA, and what transformers 5.17 builds.

Supported inputs are the MLA + MoE families whose HF tensor names agree (facts section 5):

==============  =========  ====================  ==============================================
model_type      indexers   adds indexers as      transformers 5.17 behaviour we rely on
==============  =========  ====================  ==============================================
glm_moe_dsa     yes        (itself)              honours ``indexer_types``: Shared layers have
                                                 no indexer; indexer RoPE interleaved
deepseek_v32    yes        (itself)              indexer on *every* layer (no Shared support);
                                                 indexer RoPE half-split
deepseek_v3     no         deepseek_v32          dense MLA; MoE from ``first_k_dense_replace``
glm4_moe_lite   no         glm_moe_dsa           dense MLA (GLM-4.7-Flash); MoE from
                                                 ``mlp_layer_types`` (default: layer 0 dense)
==============  =========  ====================  ==============================================

Dense families gain indexers in the DSA family of the same lineage (DeepSeek-V3.2 continues
V3.1; GLM-5 continues GLM-4.7), so the indexer's RoPE convention is that family's and the rest of
the architecture is unchanged. ``tests/unit/test_convert_schedule.py`` checks each claim in this
table against the installed transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from checkpoint_tools.errors import ConfigError


@dataclass(frozen=True)
class ModelFamily:
    """One ``model_type``'s facts (see the module table)."""

    model_type: str
    architecture: str
    has_indexers: bool
    #: model_type of the checkpoint after indexers are added (itself for DSA families).
    dsa_model_type: str
    #: transformers builds Shared layers without indexers (honours ``indexer_types``).
    supports_shared_layers: bool = False
    #: The indexer RoPE layout transformers implements (``indexer_rope_interleave``).
    indexer_rope_interleave: bool | None = None
    #: Whether transformers reads ``mlp_layer_types``; otherwise ``first_k_dense_replace`` only.
    reads_mlp_layer_types: bool = True
    #: Whether transformers derives dense layers from ``first_k_dense_replace``.
    reads_first_k_dense_replace: bool = True
    #: Dense leading layers when the config does not say (or transformers ignores the key).
    default_first_k_dense_replace: int = 3
    #: Config-class defaults for a fresh indexer: (index_topk, index_head_dim, index_n_heads).
    default_index_dims: tuple[int, int, int] | None = None


FAMILIES: dict[str, ModelFamily] = {
    f.model_type: f
    for f in (
        ModelFamily(
            "glm_moe_dsa",
            "GlmMoeDsaForCausalLM",
            has_indexers=True,
            dsa_model_type="glm_moe_dsa",
            supports_shared_layers=True,
            indexer_rope_interleave=True,
            default_index_dims=(2048, 128, 32),
        ),
        ModelFamily(
            "deepseek_v32",
            "DeepseekV32ForCausalLM",
            has_indexers=True,
            dsa_model_type="deepseek_v32",
            supports_shared_layers=False,
            indexer_rope_interleave=False,
            default_index_dims=(2048, 128, 64),
        ),
        ModelFamily(
            "deepseek_v3",
            "DeepseekV3ForCausalLM",
            has_indexers=False,
            dsa_model_type="deepseek_v32",
            reads_mlp_layer_types=False,
        ),
        ModelFamily(
            "glm4_moe_lite",
            "Glm4MoeLiteForCausalLM",
            has_indexers=False,
            dsa_model_type="glm_moe_dsa",
            reads_first_k_dense_replace=False,
            default_first_k_dense_replace=1,
        ),
    )
}


def family_of(config: Mapping[str, Any], file: str = "config.json") -> ModelFamily:
    """The family of a config dict; a clear error for anything else."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"model_type {model_type!r} is not supported (supported: {sorted(FAMILIES)})",
            file=file,
            fix="these tools handle MLA + MoE checkpoints of the GLM-5 / DeepSeek-V3 lineage",
        )
    return FAMILIES[model_type]


def mlp_layer_types(
    config: Mapping[str, Any], family: ModelFamily, file: str = "config.json"
) -> list[str]:
    """``"dense"``/``"sparse"`` per trunk layer, resolved the way transformers 5.17 does."""
    n = int(config["num_hidden_layers"])
    explicit = config.get("mlp_layer_types") if family.reads_mlp_layer_types else None
    if explicit is not None:
        if len(explicit) != n or any(t not in ("dense", "sparse") for t in explicit):
            raise ConfigError(
                f"mlp_layer_types must list 'dense'/'sparse' for each of the {n} layers",
                file=file,
            )
        return list(explicit)
    k = config.get("first_k_dense_replace") if family.reads_first_k_dense_replace else None
    k = family.default_first_k_dense_replace if k is None else int(k)
    return ["dense" if i < k else "sparse" for i in range(n)]
