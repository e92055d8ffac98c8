"""The HF tensor layout of a checkpoint, derived from config + schedule; ``model_type`` lookup.

:func:`expected_tensors` lists every tensor name with its shape for a config dict and an
:class:`~indexcache_train.schedule.IndexCacheSchedule`, by expanding the family's tensor table
(:mod:`indexcache_train.model.tensor_rules`, the same table the trainer's HF mapping expands):
Shared layers get no ``self_attn.indexer.*``; MTP layer ``k`` is ``model.layers.{N + k}`` with the
decoder tensors plus ``enorm``, ``hnorm``, ``eh_proj`` and ``shared_head.norm``.

Routed experts come in two on-disk forms and both load in transformers 5.17:

* ``per_expert``: ``mlp.experts.{e}.{gate,up,down}_proj.weight``, 2-D. What the released GLM-5 /
  DeepSeek-V3(.2) checkpoints use, what ``save_pretrained`` writes (it reverses the
  ``qwen2_moe`` conversion mapping that ``glm_moe_dsa`` / ``deepseek_v3*`` share in
  ``transformers/conversion_mapping.py``) and what vLLM / SGLang load. Our writers emit this.
* ``fused``: ``mlp.experts.gate_up_proj`` ``[E, 2 I, H]`` and ``mlp.experts.down_proj``
  ``[E, H, I]``, the in-memory parameters (e.g. a raw ``state_dict()`` dump).

Family lookups raise :class:`~checkpoint_tools.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from checkpoint_tools.errors import ConfigError
from indexcache_train.model.families import FAMILIES, ModelFamily
from indexcache_train.model.tensor_rules import (
    FUSED,
    NORMAL,
    PER_EXPERT,
    CheckpointDims,
    FamilyError,
    LayerKind,
    TensorEntry,
    layer_tensors,
    model_tensors,
)
from indexcache_train.schedule import IndexCacheSchedule

INDEXER_PART = "self_attn.indexer."
_CONFIG_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_FUSED_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.\d+\.")


@dataclass(frozen=True)
class ExpectedTensor:
    """One tensor the config implies."""

    name: str
    shape: tuple[int, ...]
    #: Must be stored in fp32 (transformers keeps ``e_score_correction_bias`` strictly fp32).
    fp32_only: bool = False
    #: Kept in fp32 by dtype conversions (transformers ``_keep_in_fp32_modules``).
    keep_fp32: bool = False
    #: A 2-D linear weight that an FP8 checkpoint may store as e4m3 + ``weight_scale_inv``.
    quantizable: bool = False
    #: May be absent (DeepSeek-V3 releases carry MTP ``embed_tokens`` / ``shared_head.head``).
    optional: bool = False
    #: How transformers initialises a fresh one (``normal`` / ``ones`` / ``zeros``).
    init: str = NORMAL


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


def dims_of(
    config: Mapping[str, Any], family: ModelFamily, file: str = "config.json"
) -> CheckpointDims:
    """The sizes the layout needs; a missing key is a :class:`ConfigError` naming it."""
    try:
        return CheckpointDims.from_config(config, family)
    except FamilyError as exc:
        raise ConfigError(str(exc), file=file, fix=f"add {exc.key} to config.json") from None


def mlp_layer_types(
    config: Mapping[str, Any], family: ModelFamily, file: str = "config.json"
) -> list[str]:
    """``"dense"``/``"sparse"`` per trunk layer, resolved the way transformers 5.17 does."""
    try:
        return family.mlp_layer_types(config)
    except FamilyError as exc:
        raise ConfigError(str(exc), file=file) from None


def config_dtype(config: Mapping[str, Any]) -> str | None:
    """The safetensors dtype string of config.json's ``dtype`` (``torch_dtype`` before v5)."""
    return _CONFIG_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")))


def layer_of(name: str) -> int | None:
    """Global layer index of a ``model.layers.{i}.*`` name, else None."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def is_indexer_tensor(name: str) -> bool:
    match = _LAYER.match(name)
    return bool(match and match.group(2).startswith(INDEXER_PART))


def indexer_prefix(layer: int) -> str:
    return f"model.layers.{layer}.{INDEXER_PART}"


def indexer_tensors(dims: CheckpointDims, family: ModelFamily, layer: int) -> list[ExpectedTensor]:
    """The lightning indexer of one Full layer (``weights_proj`` is fp32 in HF releases)."""
    if dims.q_lora_rank is None or dims.index_head_dim is None or dims.index_n_heads is None:
        raise ConfigError(
            "an indexer needs q_lora_rank, index_head_dim and index_n_heads in the config",
            fix="set them (GLM-5: 2048 / 128 / 32)",
        )
    entries = layer_tensors(family, dims, layer, LayerKind(full=True, moe=False), layer + 1)
    return _expected(e for e in entries if "full" in e.rule.when)


def detect_expert_formats(names: list[str]) -> dict[int, str]:
    """Layer -> ``per_expert`` / ``fused`` / ``mixed`` for every layer that stores routed experts."""
    found: dict[int, set[str]] = {}
    for name in names:
        if m := _FUSED_EXPERT.match(name):
            found.setdefault(int(m.group(1)), set()).add(FUSED)
        elif m := _PER_EXPERT.match(name):
            found.setdefault(int(m.group(1)), set()).add(PER_EXPERT)
    return {layer: kinds.pop() if len(kinds) == 1 else "mixed" for layer, kinds in found.items()}


def expected_tensors(
    config: Mapping[str, Any],
    schedule: IndexCacheSchedule | None,
    expert_formats: Mapping[int, str] | None = None,
    *,
    file: str = "config.json",
) -> dict[str, ExpectedTensor]:
    """Every tensor name -> expectation, embeddings first, then layer by layer.

    Args:
        config: config.json as a dict.
        schedule: layer roles; None for a dense family (no indexers at all).
        expert_formats: per-layer expert form (default ``per_expert`` everywhere).
        file: config path for error messages.
    """
    family = family_of(config, file)
    dims = dims_of(config, family, file)
    n = int(config["num_hidden_layers"])
    num_mtp = int(config.get("num_nextn_predict_layers") or 0)
    mlp_types = mlp_layer_types(config, family, file) + ["sparse"] * num_mtp
    formats = dict(expert_formats or {})
    layers = [
        LayerKind(
            full=schedule is not None and schedule.is_full(layer),
            moe=mlp_types[layer] == "sparse",
            expert_format=formats.get(layer, PER_EXPERT),
        )
        for layer in range(n + num_mtp)
    ]
    return {t.name: t for t in _expected(model_tensors(family, dims, layers, n))}


def _expected(entries: Iterable[TensorEntry]) -> list[ExpectedTensor]:
    return [
        ExpectedTensor(
            name,
            entry.shape,
            fp32_only=entry.rule.fp32_strict,
            keep_fp32=entry.rule.fp32,
            quantizable=entry.rule.quantizable,
            optional=entry.rule.optional,
            init=entry.rule.init,
        )
        for entry in entries
        for name in entry.hf
    ]
