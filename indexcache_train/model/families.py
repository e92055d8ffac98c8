"""The model-family registry: one record per HF ``model_type``, the only place family facts live.

A :class:`ModelFamily` says what the trainer and the checkpoint tools need to know about one
``model_type``: its transformers architecture and the config defaults that class fills in, its
RoPE / indexer conventions, what transformers 5.17 builds from it, its named presets and toy
factory, and its tensor table (:class:`TensorRule`: HF name, Megatron name, which layers have it,
shape, fp32 and FP8 flags). ``ModelConfig``, the HF <-> Megatron mapping, the checkpoint tools'
layout / validation / parity and the presets all read these records.

==============  ========  ===========  =================================================
model_type      indexers  DSA family   transformers 5.17 behaviour we rely on
==============  ========  ===========  =================================================
glm_moe_dsa     yes       itself       honours ``indexer_types`` (Shared layers have no
                                       indexer); indexer RoPE interleaved
deepseek_v32    yes       itself       indexer on *every* layer (no Shared support);
                                       indexer RoPE half-split
deepseek_v3     no        deepseek_v32 dense MLA; MoE from ``first_k_dense_replace``
glm4_moe_lite   no        glm_moe_dsa  dense MLA (GLM-4.7-Flash); MoE from
                                       ``mlp_layer_types`` (default: layer 0 dense)
==============  ========  ===========  =================================================

Dense families gain indexers in the DSA family of the same lineage (``convert-schedule``), so the
indexer's RoPE convention is that family's. Adding a family is one :func:`register_family` call
(plus a ``configs/model/*.yaml``); ``docs/design.md`` ("How to add a model family") has the steps
and ``tests/unit/test_families.py`` checks every record against the installed transformers.

Pure Python: transformers is imported only by the methods that build its objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from indexcache_train.model.tensor_rules import MLA_MOE_TENSORS, FamilyError, TensorTable

# ---------------------------------------------------------------------- family records
#: Sizes of the toy models (tests, demo, CPU experiments): the config class's defaults with only
#: sizes shrunk, so toys exercise the real routing, RoPE and eps values.
TOY_SIZES: Mapping[str, Any] = MappingProxyType(
    {
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
)
_INDEXER_KEYS = ("index_topk", "index_head_dim", "index_n_heads")


@dataclass(frozen=True)
class Preset:
    """A named config of a family: the config class with ``overrides`` (a toy: toy sizes too)."""

    overrides: Mapping[str, Any] = field(default_factory=dict)
    num_mtp_layers: int = 1
    toy: bool = False


@dataclass(frozen=True)
class ModelFamily:
    """Everything known about one ``model_type`` (see the module table)."""

    model_type: str
    #: transformers ``*ForCausalLM`` class name (written to ``config.json`` ``architectures``).
    architecture: str
    has_indexers: bool
    #: model_type of the checkpoint after indexers are added (itself for DSA families).
    dsa_model_type: str
    #: Defaults the transformers config class fills in for keys a config may omit.
    hf_defaults: Mapping[str, Any]
    #: transformers builds Shared layers without indexers (its config reads ``indexer_types``).
    supports_shared_layers: bool = False
    #: Main MLA RoPE on interleaved pairs (what transformers implements; never configurable there).
    rope_interleave: bool = True
    #: The indexer RoPE layout transformers implements (``indexer_rope_interleave``).
    indexer_rope_interleave: bool | None = None
    #: Whether transformers reads ``mlp_layer_types``; otherwise ``first_k_dense_replace`` only.
    reads_mlp_layer_types: bool = True
    #: Whether transformers derives dense layers from ``first_k_dense_replace``.
    reads_first_k_dense_replace: bool = True
    #: Dense leading layers when transformers reads neither key from the config.
    default_dense_layers: int = 0
    #: Where transformers exposes a layer's top-k: ``decoder_layer`` (its second output, GLM) or
    #: ``indexer`` (the indexer module's output, DeepSeek-V3.2).
    topk_output: str = "decoder_layer"
    #: Config-class arguments of the released model beyond the class defaults.
    release: Mapping[str, Any] = field(default_factory=dict)
    presets: Mapping[str, Preset] = field(default_factory=dict)
    tensors: TensorTable = MLA_MOE_TENSORS

    # ------------------------------------------------------------------ transformers
    def hf_config_class(self) -> type:
        """transformers' config class for this ``model_type`` (its auto mapping)."""
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        try:
            return CONFIG_MAPPING[self.model_type]
        except KeyError:
            raise FamilyError(
                f"transformers has no config class for model_type {self.model_type!r}; register "
                "one with transformers.AutoConfig.register"
            ) from None

    def hf_model_class(self) -> type:
        """transformers' causal-LM class for this ``model_type`` (its auto mapping)."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        try:
            return MODEL_FOR_CAUSAL_LM_MAPPING[self.hf_config_class()]
        except KeyError:
            raise FamilyError(
                f"transformers has no causal-LM class for model_type {self.model_type!r}; "
                "register one with transformers.AutoModelForCausalLM.register"
            ) from None

    def hf_config(self, num_mtp_layers: int = 1, **overrides: Any) -> dict[str, Any]:
        """The released model's config dict (class defaults + :attr:`release` + ``overrides``).

        ``num_nextn_predict_layers`` is set explicitly: transformers' configs omit it.
        """
        release = {k: dict(v) if isinstance(v, Mapping) else v for k, v in self.release.items()}
        return self._config_dict(num_mtp_layers, {**release, **overrides})

    def toy_hf_config(self, num_mtp_layers: int = 1, **overrides: Any) -> dict[str, Any]:
        """The config class's defaults with :data:`TOY_SIZES` (the keys the family has)."""
        return self._config_dict(num_mtp_layers, {**self.toy_sizes(), **overrides})

    def _config_dict(self, num_mtp_layers: int, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        d = self.hf_config_class()(**kwargs).to_dict()
        d["num_nextn_predict_layers"] = num_mtp_layers
        return d

    def toy_sizes(self) -> dict[str, Any]:
        """:data:`TOY_SIZES` less the keys this family's config does not have."""
        drop = () if self.has_indexers else _INDEXER_KEYS
        if not self.reads_first_k_dense_replace:
            drop = (*drop, "first_k_dense_replace")
        return {k: v for k, v in TOY_SIZES.items() if k not in drop}

    def preset_hf_config(self, name: str) -> dict[str, Any]:
        """The preset's full config dict (built by the transformers config class)."""
        preset = self.presets[name]
        build = self.toy_hf_config if preset.toy else self.hf_config
        return build(preset.num_mtp_layers, **preset.overrides)

    def preset_keys(self, name: str) -> dict[str, Any]:
        """The preset's config keys this record knows, without importing transformers (torch).

        Enough for the schedule and layout tools: ``model_type``, layer counts, dense layers,
        schedule keys, the family defaults (and toy sizes for a toy preset).
        """
        preset = self.presets[name]
        sizes = self.toy_sizes() if preset.toy else {}
        return {
            **self.hf_defaults,
            **sizes,
            **preset.overrides,
            "model_type": self.model_type,
            "num_nextn_predict_layers": preset.num_mtp_layers,
        }

    # ------------------------------------------------------------------ config reading
    @property
    def index_defaults(self) -> tuple[int, int, int] | None:
        """``(index_topk, index_head_dim, index_n_heads)`` of a fresh indexer in this family."""
        if not all(k in self.hf_defaults for k in _INDEXER_KEYS):
            return None
        return tuple(int(self.hf_defaults[k]) for k in _INDEXER_KEYS)  # type: ignore[return-value]

    def dense_layers_default(self) -> int:
        """Dense leading layers of a config that names none."""
        if self.reads_first_k_dense_replace:
            return int(self.hf_defaults.get("first_k_dense_replace", 0))
        return self.default_dense_layers

    def mlp_layer_types(self, config: Mapping[str, Any]) -> list[str]:
        """``"dense"`` / ``"sparse"`` per trunk layer, resolved the way transformers 5.17 does.

        Raises:
            FamilyError: an explicit ``mlp_layer_types`` of the wrong length or vocabulary.
        """
        n = int(config["num_hidden_layers"])
        explicit = config.get("mlp_layer_types") if self.reads_mlp_layer_types else None
        if explicit is not None:
            if len(explicit) != n or any(t not in ("dense", "sparse") for t in explicit):
                raise FamilyError(
                    f"mlp_layer_types must list 'dense'/'sparse' for each of the {n} layers",
                    key="mlp_layer_types",
                )
            return list(explicit)
        k = config.get("first_k_dense_replace") if self.reads_first_k_dense_replace else None
        k = self.dense_layers_default() if k is None else int(k)
        return ["dense" if i < k else "sparse" for i in range(n)]


# ---------------------------------------------------------------------- the registry
_REGISTRY: dict[str, ModelFamily] = {}
#: model_type -> record (a live, read-only view of the registry).
FAMILIES: Mapping[str, ModelFamily] = MappingProxyType(_REGISTRY)


def register_family(family: ModelFamily, *, replace: bool = False) -> ModelFamily:
    """Add a record; an existing ``model_type`` is refused unless ``replace``."""
    if family.model_type in _REGISTRY and not replace:
        raise ValueError(f"model family {family.model_type!r} is already registered")
    for name in family.presets:
        owner = preset_owner(name)
        if owner is not None and owner.model_type != family.model_type:
            raise ValueError(f"preset {name!r} already belongs to {owner.model_type}")
    _REGISTRY[family.model_type] = family
    return family


def unregister_family(model_type: str) -> None:
    """Remove a record (for tests that register a family of their own)."""
    _REGISTRY.pop(model_type, None)


def get_family(model_type: object) -> ModelFamily:
    """The record of ``model_type``; :class:`FamilyError` listing the registered ones otherwise."""
    if model_type not in _REGISTRY:
        raise FamilyError(
            f"model_type {model_type!r} is not supported (supported: {sorted(_REGISTRY)})",
            key="model_type",
        )
    return _REGISTRY[model_type]  # type: ignore[index]


def trainable_model_types() -> tuple[str, ...]:
    """The families the trainer builds: DSA families (they have indexers)."""
    return tuple(t for t, f in _REGISTRY.items() if f.has_indexers)


def preset_owner(name: str) -> ModelFamily | None:
    """The family that defines preset ``name``, if any."""
    return next((f for f in _REGISTRY.values() if name in f.presets), None)


def preset_names() -> list[str]:
    return [name for f in _REGISTRY.values() for name in f.presets]


# The two DSA families share transformers' routing / eps defaults except where noted.
_COMMON_DEFAULTS: dict[str, Any] = {
    "num_hidden_layers": 61,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 2.5,
    "n_shared_experts": 1,
    "first_k_dense_replace": 3,
    "attention_bias": False,
}
_DSA_DEFAULTS = {**_COMMON_DEFAULTS, "index_topk": 2048, "index_head_dim": 128}

#: DeepSeek-V3.2's released YaRN RoPE (its config.json; the config class default is plain RoPE).
DSV32_YARN: Mapping[str, Any] = MappingProxyType(
    {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
)
#: GLM-5-shaped bench model (issue #12): hidden 2048, 16 layers, 16 heads, GLM-5 MLA dims,
#: indexer 32x128, k 2048, dense MLPs (MoE off so one GPU measures attention, not routing).
BENCH_GLM5: Mapping[str, Any] = MappingProxyType(
    {
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
)

GLM_MOE_DSA = register_family(
    ModelFamily(
        "glm_moe_dsa",
        "GlmMoeDsaForCausalLM",
        has_indexers=True,
        dsa_model_type="glm_moe_dsa",
        hf_defaults={
            **_DSA_DEFAULTS,
            "num_hidden_layers": 78,
            "rms_norm_eps": 1e-5,
            "index_n_heads": 32,
            "max_position_embeddings": 202752,
        },
        supports_shared_layers=True,
        indexer_rope_interleave=True,
        presets={
            # GLM-5: plain DSA (every layer and the MTP layer has its own indexer).
            "glm5": Preset({"index_topk_freq": 1, "index_skip_topk_offset": 1}),
            # GLM-5.2: freq 4 / offset 3 -> Full {0, 1, 2, 6, 10, ..., 74}, MTP layer 78 Full.
            "glm5.2": Preset({"index_topk_freq": 4, "index_skip_topk_offset": 3}),
            "glm5_toy": Preset(toy=True),
            "bench_glm5": Preset(BENCH_GLM5, num_mtp_layers=0),
        },
    )
)
DEEPSEEK_V32 = register_family(
    ModelFamily(
        "deepseek_v32",
        "DeepseekV32ForCausalLM",
        has_indexers=True,
        dsa_model_type="deepseek_v32",
        hf_defaults={
            **_DSA_DEFAULTS,
            "n_group": 8,
            "topk_group": 4,
            "index_n_heads": 64,
            "max_position_embeddings": 163840,
        },
        indexer_rope_interleave=False,
        topk_output="indexer",
        release={"rope_parameters": dict(DSV32_YARN)},
        presets={
            "deepseek-v3.2": Preset(),
            # n_group 8 / topk_group 4 / top-8 routing kept: the real grouped-routing path.
            "dsv32_toy": Preset(toy=True),
        },
    )
)
DEEPSEEK_V3 = register_family(
    ModelFamily(
        "deepseek_v3",
        "DeepseekV3ForCausalLM",
        has_indexers=False,
        dsa_model_type="deepseek_v32",
        hf_defaults={**_COMMON_DEFAULTS, "n_group": 8, "topk_group": 4},
        reads_mlp_layer_types=False,
    )
)
GLM4_MOE_LITE = register_family(
    ModelFamily(
        "glm4_moe_lite",
        "Glm4MoeLiteForCausalLM",
        has_indexers=False,
        dsa_model_type="glm_moe_dsa",
        hf_defaults={
            **{k: v for k, v in _COMMON_DEFAULTS.items() if k != "first_k_dense_replace"},
            "num_hidden_layers": 47,
            "rms_norm_eps": 1e-5,
            "routed_scaling_factor": 1.8,
        },
        reads_first_k_dense_replace=False,
        default_dense_layers=1,
    )
)
