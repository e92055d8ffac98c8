"""``ModelConfig``: the typed model description, read from (and written back to) HF configs.

Builds every DSA family of the registry (:mod:`indexcache_train.model.families`: ``glm_moe_dsa``
for GLM-5 / 5.1 / 5.2, ``deepseek_v32`` for DeepSeek-V3.2); the family's record supplies the
config defaults, architecture and RoPE conventions. Every HF field is either implemented, checked
to have the one value we implement, or known to be irrelevant to training (listed in
``_IGNORED``); anything else is rejected, so a config feature is never silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from indexcache_train.model.families import ModelFamily, get_family, trainable_model_types
from indexcache_train.schedule import IndexCacheSchedule, ScheduleError

# Fields HF writes that carry no model semantics for training.
_IGNORED = {
    "architectures",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "_name_or_path",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "keys_to_ignore_at_inference",
    "ep_size",
    "quantization_config",
    "auto_map",
    "tokenizer_class",
    "_attn_implementation_autoset",
    "pretraining_tp",
    "num_key_value_heads",
    "head_dim",
    "qk_head_dim",
    "layer_types",
    "mlp_layer_types",
    "rope_theta",
    "rope_scaling",
    "model_type",
    # IndexCache schedule keys are read by IndexCacheSchedule.from_hf_config.
    "index_topk_freq",
    "index_skip_topk_offset",
    "index_topk_pattern",
    "indexer_types",
    "index_share_for_mtp_iteration",
}
# Fields that must hold exactly the value we implement (value, why).
_FIXED: dict[str, tuple[Any, str]] = {
    "attention_bias": (False, "MLA projections without bias"),
    "attention_dropout": (0.0, "no attention dropout"),
    "mlp_bias": (False, "MLPs without bias"),
    "hidden_act": ("silu", "SwiGLU MLPs"),
    "norm_topk_prob": (True, "Megatron's sigmoid router always renormalises the top-k scores"),
    "scoring_func": ("sigmoid", "sigmoid router"),
    "topk_method": ("noaux_tc", "aux-loss-free routing with expert bias"),
    "moe_layer_freq": (1, "every layer after first_k_dense_replace is MoE"),
}


@dataclass(frozen=True)
class RopeConfig:
    """RoPE for the 64-dim rotary slice; ``rope_type`` ``default`` or ``yarn`` (HF semantics)."""

    rope_theta: float = 10000.0
    rope_type: str = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name not in out and v is not None and not (f.name == "truncate" and v):
                out[f.name] = v
        return out

    def softmax_mscale(self) -> float:
        """Factor on the attention softmax scale (HF ``yarn_apply_mscale``: mscale_all_dim twice)."""
        if self.rope_type == "default" or not self.mscale_all_dim or not self.factor:
            return 1.0
        m = _yarn_get_mscale(self.factor, self.mscale_all_dim)
        return m * m


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class ModelConfig:
    """A GLM-5 / DeepSeek-V3.2-shaped DSA model (HF field names)."""

    #: The HF ``model_type`` (a DSA family of :mod:`indexcache_train.model.families`).
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    first_k_dense_replace: int
    rms_norm_eps: float
    index_topk: int
    index_head_dim: int
    index_n_heads: int
    schedule: IndexCacheSchedule
    rope: RopeConfig = field(default_factory=RopeConfig)
    num_nextn_predict_layers: int = 0
    #: Main MLA RoPE on interleaved pairs (default: the family's, ``ModelFamily.rope_interleave``).
    rope_interleave: bool = True
    #: Indexer RoPE interleaved (GLM) or half-split (DeepSeek-V3.2); default: the family's.
    indexer_rope_interleave: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 202752
    initializer_range: float = 0.02
    #: eps of q_a / kv_a norms and the indexer k_norm: HF hard-codes 1e-6 regardless of rms_norm_eps.
    latent_norm_eps: float = 1e-6
    index_k_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.family not in trainable_model_types():
            raise ValueError(
                f"model family {self.family!r} unsupported; use one of {trainable_model_types()}"
            )
        if self.schedule.num_layers != self.num_hidden_layers:
            raise ValueError(
                f"schedule covers {self.schedule.num_layers} layers but num_hidden_layers="
                f"{self.num_hidden_layers}"
            )
        if self.schedule.num_mtp_layers != self.num_nextn_predict_layers:
            raise ValueError(
                f"schedule covers {self.schedule.num_mtp_layers} MTP layers but "
                f"num_nextn_predict_layers={self.num_nextn_predict_layers}"
            )
        if self.n_group > 1:
            if self.n_routed_experts % self.n_group:
                raise ValueError("n_routed_experts must be divisible by n_group")
            if self.num_experts_per_tok // self.topk_group != 2:
                # Megatron's group_limited_topk scores a group by the sum of its top
                # (topk // group_topk) experts; HF (DeepSeek) always uses the top 2.
                raise ValueError(
                    f"grouped routing needs num_experts_per_tok // topk_group == 2 to match HF "
                    f"(got {self.num_experts_per_tok} // {self.topk_group}); Megatron-Core 0.19.2 "
                    "scores groups by their top (topk // topk_group) experts"
                )
        if self.qk_rope_head_dim > self.index_head_dim:
            raise ValueError("index_head_dim must be >= qk_rope_head_dim (RoPE slice comes first)")

    # ---------------------------------------------------------------- derived
    @property
    def family_record(self) -> ModelFamily:
        """This model's registry record."""
        return get_family(self.family)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def num_mtp_layers(self) -> int:
        return self.num_nextn_predict_layers

    def is_moe_layer(self, index: int) -> bool:
        """MoE for global indices >= first_k_dense_replace (MTP layers included, as in DeepSeek)."""
        return index >= self.first_k_dense_replace

    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5 * self.rope.softmax_mscale()

    def with_schedule(self, schedule: IndexCacheSchedule) -> ModelConfig:
        return replace(self, schedule=schedule)

    # ---------------------------------------------------------------- HF I/O
    @classmethod
    def from_hf_config(
        cls,
        hf: Mapping[str, Any],
        schedule: IndexCacheSchedule | None = None,
        num_mtp_layers: int | None = None,
    ) -> ModelConfig:
        """Build from an HF ``config.json`` dict; rejects fields we do not implement.

        ``schedule`` overrides the schedule keys found in ``hf`` (e.g. an experiment that
        switches an all-Full checkpoint to freq 4); ``num_mtp_layers`` overrides
        ``num_nextn_predict_layers`` (transformers' own configs omit it).
        """
        hf = dict(hf)
        family = hf.get("model_type")
        if family not in trainable_model_types():
            raise ValueError(
                f"config model_type={family!r} is not a DSA model this trainer supports; "
                f"expected one of {trainable_model_types()}"
            )
        record = get_family(family)
        unknown = sorted(
            k
            for k in hf
            if k not in _IGNORED and k not in _FIXED and k not in _FIELD_NAMES and k not in _HF_ONLY
        )
        if unknown:
            raise ValueError(
                f"config field(s) {unknown} are not implemented by this trainer's {family} model; "
                "remove them or extend indexcache_train.model.config (fields are never ignored "
                "silently)"
            )
        for key, (want, why) in _FIXED.items():
            if key in hf and hf[key] != want:
                raise ValueError(f"config {key}={hf[key]!r} unsupported: only {want!r} ({why})")
        n_kv = hf.get("num_key_value_heads")
        if n_kv is not None and n_kv != hf.get("num_attention_heads"):
            raise ValueError("MLA needs num_key_value_heads == num_attention_heads")
        if hf.get("q_lora_rank") is None:
            raise ValueError("q_lora_rank=None (no q LoRA) is unsupported: DSA indexers read q_a")
        n = int(hf["num_hidden_layers"])
        mtp = (
            int(hf.get("num_nextn_predict_layers") or 0)
            if num_mtp_layers is None
            else num_mtp_layers
        )
        _check_layer_types(hf, n, record)
        if schedule is None:
            try:
                schedule = IndexCacheSchedule.from_hf_config(hf, num_mtp_layers=mtp)
            except ScheduleError as e:
                raise ValueError(f"config schedule keys invalid: {e}") from e
        get = lambda k: hf.get(k, record.hf_defaults.get(k))  # noqa: E731
        kwargs = {f: get(f) for f in _FIELD_NAMES if f not in ("family", "schedule", "rope")}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs["num_nextn_predict_layers"] = mtp
        kwargs["indexer_rope_interleave"] = bool(
            hf.get("indexer_rope_interleave", record.indexer_rope_interleave)
        )
        kwargs["rope_interleave"] = bool(hf.get("rope_interleave", record.rope_interleave))
        return cls(family=family, schedule=schedule, rope=_read_rope(hf), **kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """An HF ``config.json`` dict with every schedule key explicit."""
        record = self.family_record
        out: dict[str, Any] = {"model_type": self.family, "architectures": [record.architecture]}
        for f in fields(self):
            if f.name in ("family", "schedule", "rope", "latent_norm_eps", "index_k_norm_eps"):
                continue
            out[f.name] = getattr(self, f.name)
        out["num_key_value_heads"] = self.num_attention_heads
        out["rope_parameters"] = self.rope.to_hf()
        out["hidden_act"] = "silu"
        out["norm_topk_prob"] = True
        out["attention_bias"] = False
        n_dense = min(self.first_k_dense_replace, self.num_hidden_layers)
        out["mlp_layer_types"] = ["dense"] * n_dense + ["sparse"] * (
            self.num_hidden_layers - n_dense
        )
        out.update(self.schedule.to_hf_config())
        if not record.supports_shared_layers:
            # e.g. transformers 5.17's DeepseekV32Config: no indexer_types (all layers Full).
            out.pop("indexer_types")
        return out


_FIELD_NAMES = {f.name for f in fields(ModelConfig)}
# HF-only keys we read into other fields.
_HF_ONLY = {
    "rope_parameters",
    "rope_interleave",
    "indexer_rope_interleave",
    "num_nextn_predict_layers",
}


def _read_rope(hf: Mapping[str, Any]) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling")
    if legacy:
        params = {**{k: v for k, v in dict(legacy).items() if k != "type"}, **params}
        params.setdefault("rope_type", legacy.get("rope_type", legacy.get("type")))
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    kind = params["rope_type"]
    if kind not in ("default", "yarn"):
        raise ValueError(f"rope_type={kind!r} unsupported; use 'default' or 'yarn'")
    known = {f.name for f in fields(RopeConfig)}
    extra = sorted(set(params) - known)
    if extra:
        raise ValueError(f"rope_parameters key(s) {extra} unsupported")
    if kind == "yarn" and (
        params.get("factor") is None or params.get("original_max_position_embeddings") is None
    ):
        raise ValueError("yarn rope needs 'factor' and 'original_max_position_embeddings'")
    return RopeConfig(**params)


def _check_layer_types(hf: Mapping[str, Any], n: int, family: ModelFamily) -> None:
    types = hf.get("layer_types")
    if types is not None and any(t != "deepseek_sparse_attention" for t in types):
        raise ValueError("layer_types other than 'deepseek_sparse_attention' are unsupported")
    mlp = hf.get("mlp_layer_types")
    if mlp is not None:
        k = int(hf.get("first_k_dense_replace", family.dense_layers_default()))
        want = ["dense"] * min(k, n) + ["sparse"] * (n - min(k, n))
        if list(mlp) != want:
            raise ValueError(
                "mlp_layer_types must be first_k_dense_replace dense layers then MoE layers "
                f"(expected {want[:5]}...), got {list(mlp)[:5]}..."
            )
