"""The HF tensor layout of an MLA + MoE (+ DSA indexer) checkpoint, derived from config + schedule.

One function, :func:`expected_tensors`, lists every tensor name with its shape for a config dict
and an :class:`~indexcache_train.schedule.IndexCacheSchedule` (facts section 5): Shared layers
get no ``self_attn.indexer.*``; MTP layer ``k`` is ``model.layers.{N + k}`` with the decoder
tensors plus ``enorm``, ``hnorm``, ``eh_proj`` and ``shared_head.norm``.

Routed experts come in two on-disk forms and both load in transformers 5.17:

* ``per_expert``: ``mlp.experts.{e}.{gate,up,down}_proj.weight``, 2-D. What the released GLM-5 /
  DeepSeek-V3(.2) checkpoints use, what ``save_pretrained`` writes (it reverses the
  ``qwen2_moe`` conversion mapping that ``glm_moe_dsa`` / ``deepseek_v3*`` share in
  ``transformers/conversion_mapping.py``) and what vLLM / SGLang load. Our writers emit this.
* ``fused``: ``mlp.experts.gate_up_proj`` ``[E, 2 I, H]`` and ``mlp.experts.down_proj``
  ``[E, H, I]``, the in-memory parameters (e.g. a raw ``state_dict()`` dump).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from checkpoint_tools.errors import ConfigError
from checkpoint_tools.families import ModelFamily, family_of, mlp_layer_types
from indexcache_train.schedule import IndexCacheSchedule

PER_EXPERT = "per_expert"
FUSED = "fused"
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
    #: A 2-D linear weight that an FP8 checkpoint may store as e4m3 + ``weight_scale_inv``.
    quantizable: bool = False
    #: May be absent (DeepSeek-V3 releases carry MTP ``embed_tokens`` / ``shared_head.head``).
    optional: bool = False


@dataclass(frozen=True)
class ModelDims:
    """The config sizes the layout needs; built by :meth:`from_config` with clear errors."""

    hidden: int
    vocab: int
    intermediate: int
    moe_intermediate: int
    heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_head: int
    n_routed_experts: int
    n_shared_experts: int
    attention_bias: bool
    tie_word_embeddings: bool
    index_head_dim: int | None
    index_n_heads: int | None

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], family: ModelFamily, file: str = "config.json"
    ) -> ModelDims:
        def need(key: str) -> int:
            if config.get(key) is None:
                raise ConfigError(f"config lacks {key}", file=file, fix=f"add {key} to config.json")
            return int(config[key])

        index_defaults = family.default_index_dims or (None, None, None)
        return cls(
            hidden=need("hidden_size"),
            vocab=need("vocab_size"),
            intermediate=need("intermediate_size"),
            moe_intermediate=need("moe_intermediate_size"),
            heads=need("num_attention_heads"),
            q_lora_rank=None if config.get("q_lora_rank") is None else int(config["q_lora_rank"]),
            kv_lora_rank=need("kv_lora_rank"),
            qk_nope=need("qk_nope_head_dim"),
            qk_rope=need("qk_rope_head_dim"),
            v_head=need("v_head_dim"),
            n_routed_experts=need("n_routed_experts"),
            n_shared_experts=int(config.get("n_shared_experts") or 0),
            attention_bias=bool(config.get("attention_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            index_head_dim=int(config.get("index_head_dim") or index_defaults[1] or 0) or None,
            index_n_heads=int(config.get("index_n_heads") or index_defaults[2] or 0) or None,
        )


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


def indexer_tensors(dims: ModelDims, layer: int) -> list[ExpectedTensor]:
    """The lightning indexer of one Full layer (``weights_proj`` is fp32 in HF releases)."""
    if dims.q_lora_rank is None or dims.index_head_dim is None or dims.index_n_heads is None:
        raise ConfigError(
            "an indexer needs q_lora_rank, index_head_dim and index_n_heads in the config",
            fix="set them (GLM-5: 2048 / 128 / 32)",
        )
    p, d = indexer_prefix(layer), dims.index_head_dim
    return [
        ExpectedTensor(
            p + "wq_b.weight", (dims.index_n_heads * d, dims.q_lora_rank), quantizable=True
        ),
        ExpectedTensor(p + "wk.weight", (d, dims.hidden), quantizable=True),
        ExpectedTensor(p + "k_norm.weight", (d,)),
        ExpectedTensor(p + "k_norm.bias", (d,)),
        ExpectedTensor(p + "weights_proj.weight", (dims.index_n_heads, dims.hidden)),
    ]


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
    dims = ModelDims.from_config(config, family, file)
    n = int(config["num_hidden_layers"])
    num_mtp = int(config.get("num_nextn_predict_layers") or 0)
    mlp_types = mlp_layer_types(config, family, file) + ["sparse"] * num_mtp
    formats = dict(expert_formats or {})
    out: list[ExpectedTensor] = [
        ExpectedTensor("model.embed_tokens.weight", (dims.vocab, dims.hidden))
    ]
    for layer in range(n + num_mtp):
        full = schedule is not None and schedule.is_full(layer)
        out += _decoder_layer(dims, layer, mlp_types[layer], formats.get(layer, PER_EXPERT), full)
        if layer >= n:
            out += _mtp_extras(dims, layer)
    out.append(ExpectedTensor("model.norm.weight", (dims.hidden,)))
    if not dims.tie_word_embeddings:
        out.append(ExpectedTensor("lm_head.weight", (dims.vocab, dims.hidden)))
    return {t.name: t for t in out}


def _decoder_layer(
    dims: ModelDims, layer: int, mlp_kind: str, expert_format: str, full: bool
) -> list[ExpectedTensor]:
    p = f"model.layers.{layer}."
    out = [
        ExpectedTensor(p + "input_layernorm.weight", (dims.hidden,)),
        ExpectedTensor(p + "post_attention_layernorm.weight", (dims.hidden,)),
    ]
    out += _attention(dims, p + "self_attn.")
    if full:
        out += indexer_tensors(dims, layer)
    if mlp_kind == "dense":
        out += _mlp(p + "mlp.", dims.hidden, dims.intermediate)
    else:
        out += _moe(dims, p + "mlp.", expert_format)
    return out


def _attention(dims: ModelDims, a: str) -> list[ExpectedTensor]:
    h, qk = dims.hidden, dims.qk_nope + dims.qk_rope
    out = []
    if dims.q_lora_rank is None:
        out.append(_linear(a + "q_proj", dims.heads * qk, h))
    else:
        out += [
            _linear(a + "q_a_proj", dims.q_lora_rank, h),
            ExpectedTensor(a + "q_a_layernorm.weight", (dims.q_lora_rank,)),
            _linear(a + "q_b_proj", dims.heads * qk, dims.q_lora_rank),
        ]
    out += [
        _linear(a + "kv_a_proj_with_mqa", dims.kv_lora_rank + dims.qk_rope, h),
        ExpectedTensor(a + "kv_a_layernorm.weight", (dims.kv_lora_rank,)),
        _linear(a + "kv_b_proj", dims.heads * (dims.qk_nope + dims.v_head), dims.kv_lora_rank),
        _linear(a + "o_proj", h, dims.heads * dims.v_head),
    ]
    if dims.attention_bias:  # transformers puts biases on q_a, kv_a and o only
        out += [
            ExpectedTensor(a + name + ".bias", (size,))
            for name, size in (
                ("q_a_proj", dims.q_lora_rank),
                ("kv_a_proj_with_mqa", dims.kv_lora_rank + dims.qk_rope),
                ("o_proj", h),
            )
            if size is not None
        ]
    return out


def _mlp(p: str, hidden: int, inner: int) -> list[ExpectedTensor]:
    return [
        _linear(p + "gate_proj", inner, hidden),
        _linear(p + "up_proj", inner, hidden),
        _linear(p + "down_proj", hidden, inner),
    ]


def _moe(dims: ModelDims, p: str, expert_format: str) -> list[ExpectedTensor]:
    e, h, i = dims.n_routed_experts, dims.hidden, dims.moe_intermediate
    out = [
        ExpectedTensor(p + "gate.weight", (e, h)),
        ExpectedTensor(p + "gate.e_score_correction_bias", (e,), fp32_only=True),
    ]
    if expert_format == FUSED:
        out += [
            ExpectedTensor(p + "experts.gate_up_proj", (e, 2 * i, h)),
            ExpectedTensor(p + "experts.down_proj", (e, h, i)),
        ]
    else:
        for k in range(e):
            out += _mlp(f"{p}experts.{k}.", h, i)
    if dims.n_shared_experts:
        out += _mlp(p + "shared_experts.", h, i * dims.n_shared_experts)
    return out


def _mtp_extras(dims: ModelDims, layer: int) -> list[ExpectedTensor]:
    p, h = f"model.layers.{layer}.", dims.hidden
    return [
        ExpectedTensor(p + "enorm.weight", (h,)),
        ExpectedTensor(p + "hnorm.weight", (h,)),
        _linear(p + "eh_proj", h, 2 * h),
        ExpectedTensor(p + "shared_head.norm.weight", (h,)),
        ExpectedTensor(p + "embed_tokens.weight", (dims.vocab, h), optional=True),
        ExpectedTensor(p + "shared_head.head.weight", (dims.vocab, h), optional=True),
    ]


def _linear(prefix: str, out_features: int, in_features: int) -> ExpectedTensor:
    return ExpectedTensor(prefix + ".weight", (out_features, in_features), quantizable=True)
