"""Tensor rules: every tensor of an MLA + MoE (+ DSA indexer) model, HF and Megatron names.

A :class:`TensorTable` lists :class:`TensorRule` s (HF name(s), Megatron name, the layers that have
it, its shape as a function of :class:`CheckpointDims`, fp32 / FP8 / init flags);
:func:`model_tensors` expands a table for one concrete model (layer roles from the IndexCache
schedule and the MLP kinds) in checkpoint order. Each model family
(:mod:`indexcache_train.model.families`) names its table; the HF <-> Megatron mapping and the
checkpoint tools' layout are both expansions of it.

* Shared layers have no ``self_attn.indexer.*`` (rule condition ``full``).
* MTP layer ``k`` is ``model.layers.{N+k}`` with the decoder tensors plus ``enorm``, ``hnorm``,
  ``eh_proj`` and ``shared_head.norm`` (= Megatron's MTP ``final_layernorm``); its embedding and
  head are the trunk's.
* Gated MLPs: Megatron's ``linear_fc1`` is ``cat([gate_proj; up_proj], dim=0)``.
* Routed experts are stored per expert (``mlp.experts.{e}.*``, what releases and
  ``save_pretrained`` write) or fused (``mlp.experts.gate_up_proj`` / ``down_proj``, a raw
  ``state_dict()`` dump); the trainer maps the per-expert form.

Pure Python (no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from indexcache_train.model.families import ModelFamily

PER_EXPERT, FUSED = "per_expert", "fused"
#: Initial values transformers gives a fresh tensor (``_init_weights``).
NORMAL, ONES, ZEROS = "normal", "ones", "zeros"


class FamilyError(ValueError):
    """An unknown ``model_type`` or a config key a family needs; ``key`` names the key."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# ---------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class CheckpointDims:
    """The config sizes the tensor shapes need (HF key names in :meth:`from_config`)."""

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
    def from_config(cls, config: Mapping[str, Any], family: ModelFamily) -> CheckpointDims:
        """Sizes of an HF config dict; a key the config omits takes the family's default.

        Raises:
            FamilyError: a required key is missing (``err.key`` names it).
        """

        def get(key: str) -> Any:
            return config[key] if config.get(key) is not None else family.hf_defaults.get(key)

        def need(key: str) -> int:
            value = get(key)
            if value is None:
                raise FamilyError(f"config lacks {key}", key=key)
            return int(value)

        def optional(key: str) -> int | None:
            value = get(key)
            return None if value is None else int(value)

        return cls(
            hidden=need("hidden_size"),
            vocab=need("vocab_size"),
            intermediate=need("intermediate_size"),
            moe_intermediate=need("moe_intermediate_size"),
            heads=need("num_attention_heads"),
            q_lora_rank=optional("q_lora_rank"),
            kv_lora_rank=need("kv_lora_rank"),
            qk_nope=need("qk_nope_head_dim"),
            qk_rope=need("qk_rope_head_dim"),
            v_head=need("v_head_dim"),
            n_routed_experts=need("n_routed_experts"),
            n_shared_experts=optional("n_shared_experts") or 0,
            attention_bias=bool(get("attention_bias")),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            index_head_dim=optional("index_head_dim"),
            index_n_heads=optional("index_n_heads"),
        )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope + self.qk_rope


# ---------------------------------------------------------------------- tensor rules
Shape = Callable[[CheckpointDims], tuple[int, ...]]


@dataclass(frozen=True)
class TensorRule:
    """One tensor (or one Megatron tensor made of several HF tensors) of a model.

    Names are relative to the layer prefix for layer / MTP rules (``model.layers.{i}.`` on the HF
    side) and absolute for model rules. ``{e}`` in a name repeats the rule per routed expert.
    """

    #: HF tensor name(s); several are concatenated along dim 0 into the Megatron tensor.
    hf: tuple[str, ...]
    #: The Megatron parameter, or None when the trainer has no such parameter.
    megatron: str | None
    #: Shape of each HF part.
    shape: Shape
    #: Conditions that must all hold (see :data:`CONDITIONS`); empty: every layer.
    when: frozenset[str] = frozenset()
    #: Kept in fp32 by every dtype conversion (transformers ``_keep_in_fp32_modules``).
    fp32: bool = False
    #: Must be stored in fp32 (transformers ``_keep_in_fp32_modules_strict``).
    fp32_strict: bool = False
    #: A 2-D linear weight an FP8 checkpoint may store as e4m3 + ``weight_scale_inv``.
    quantizable: bool = False
    #: May be absent (DeepSeek-V3 releases carry MTP ``embed_tokens`` / ``shared_head.head``).
    optional: bool = False
    #: How transformers initialises a fresh one (``normal(0, initializer_range)`` / ones / zeros).
    init: str = NORMAL

    @property
    def per_expert(self) -> bool:
        return any("{e}" in h for h in self.hf)


#: Rule conditions: layer roles (``full`` = has an indexer; ``dense`` / ``moe`` MLP), the routed
#: experts' storage form, and config properties.
CONDITIONS = frozenset(
    {"full", "dense", "moe", PER_EXPERT, FUSED}
    | {"q_lora", "no_q_lora", "bias", "shared_experts", "untied"}
)


def _rule(
    hf: str | tuple[str, ...], megatron: str | None, shape: Shape, *when: str, **kw: Any
) -> TensorRule:
    unknown = set(when) - CONDITIONS
    if unknown:
        raise ValueError(f"unknown tensor-rule condition(s) {sorted(unknown)}")
    return TensorRule(
        hf if isinstance(hf, tuple) else (hf,), megatron, shape, frozenset(when), **kw
    )


def _linear(hf: str, megatron: str | None, shape: Shape, *when: str, **kw: Any) -> TensorRule:
    mg = None if megatron is None else megatron + ".weight"
    return _rule(hf + ".weight", mg, shape, *when, quantizable=True, **kw)


def _norm(hf: str, megatron: str | None, shape: Shape, *when: str) -> TensorRule:
    return _rule(hf, megatron, shape, *when, init=ONES)


def _gated_mlp(hf: str, megatron: str, inner: Shape, *when: str) -> tuple[TensorRule, ...]:
    """``gate_proj`` / ``up_proj`` / ``down_proj``; Megatron's ``linear_fc1`` = ``[gate; up]``."""
    return (
        _rule(
            (hf + "gate_proj.weight", hf + "up_proj.weight"),
            megatron + "linear_fc1.weight",
            lambda d: (inner(d), d.hidden),
            *when,
            quantizable=True,
        ),
        _linear(hf + "down_proj", megatron + "linear_fc2", lambda d: (d.hidden, inner(d)), *when),
    )


@dataclass(frozen=True)
class TensorTable:
    """A family's tensors, in checkpoint order: head, each layer (+ MTP extras), tail."""

    head: tuple[TensorRule, ...]
    layer: tuple[TensorRule, ...]
    #: Extra tensors of an MTP layer, after its decoder-layer tensors.
    mtp: tuple[TensorRule, ...]
    tail: tuple[TensorRule, ...]


_A, _I = "self_attn.", "self_attn.indexer."
_MA, _MI = "self_attention.", "self_attention.core_attention.indexer."

#: The MLA + MoE (+ DSA indexer) layout shared by every family above (facts section 5).
MLA_MOE_TENSORS = TensorTable(
    head=(
        _rule(
            "model.embed_tokens.weight",
            "embedding.word_embeddings.weight",
            lambda d: (d.vocab, d.hidden),
        ),
    ),
    layer=(
        _norm("input_layernorm.weight", "input_layernorm.weight", lambda d: (d.hidden,)),
        _norm("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", lambda d: (d.hidden,)),
        _linear(_A + "q_proj", None, lambda d: (d.heads * d.qk_head_dim, d.hidden), "no_q_lora"),
        _linear(
            _A + "q_a_proj",
            _MA + "linear_q_down_proj",
            lambda d: (d.q_lora_rank, d.hidden),
            "q_lora",
        ),
        _norm(
            _A + "q_a_layernorm.weight",
            _MA + "q_layernorm.weight",
            lambda d: (d.q_lora_rank,),
            "q_lora",
        ),
        _linear(
            _A + "q_b_proj",
            _MA + "linear_q_up_proj",
            lambda d: (d.heads * d.qk_head_dim, d.q_lora_rank),
            "q_lora",
        ),
        _linear(
            _A + "kv_a_proj_with_mqa",
            _MA + "linear_kv_down_proj",
            lambda d: (d.kv_lora_rank + d.qk_rope, d.hidden),
        ),
        _norm(
            _A + "kv_a_layernorm.weight", _MA + "kv_layernorm.weight", lambda d: (d.kv_lora_rank,)
        ),
        _linear(
            _A + "kv_b_proj",
            _MA + "linear_kv_up_proj",
            lambda d: (d.heads * (d.qk_nope + d.v_head), d.kv_lora_rank),
        ),
        _linear(_A + "o_proj", _MA + "linear_proj", lambda d: (d.hidden, d.heads * d.v_head)),
        # transformers puts attention biases on q_a, kv_a and o only; the trainer has none.
        _rule(_A + "q_a_proj.bias", None, lambda d: (d.q_lora_rank,), "bias", "q_lora", init=ZEROS),
        _rule(
            _A + "kv_a_proj_with_mqa.bias",
            None,
            lambda d: (d.kv_lora_rank + d.qk_rope,),
            "bias",
            init=ZEROS,
        ),
        _rule(_A + "o_proj.bias", None, lambda d: (d.hidden,), "bias", init=ZEROS),
        # The lightning indexer, on Full layers only.
        _linear(
            _I + "wq_b",
            _MI + "linear_wq_b",
            lambda d: (d.index_n_heads * d.index_head_dim, d.q_lora_rank),
            "full",
        ),
        _linear(_I + "wk", _MI + "linear_wk", lambda d: (d.index_head_dim, d.hidden), "full"),
        _norm(_I + "k_norm.weight", _MI + "k_norm.weight", lambda d: (d.index_head_dim,), "full"),
        _rule(
            _I + "k_norm.bias",
            _MI + "k_norm.bias",
            lambda d: (d.index_head_dim,),
            "full",
            init=ZEROS,
        ),
        _rule(
            _I + "weights_proj.weight",
            _MI + "linear_weights_proj.weight",
            lambda d: (d.index_n_heads, d.hidden),
            "full",
            fp32=True,
        ),
        *_gated_mlp("mlp.", "mlp.", lambda d: d.intermediate, "dense"),
        _rule(
            "mlp.gate.weight", "mlp.router.weight", lambda d: (d.n_routed_experts, d.hidden), "moe"
        ),
        _rule(
            "mlp.gate.e_score_correction_bias",
            "mlp.router.expert_bias",
            lambda d: (d.n_routed_experts,),
            "moe",
            fp32=True,
            fp32_strict=True,
            init=ZEROS,
        ),
        *_gated_mlp(
            "mlp.experts.{e}.",
            "mlp.experts.local_experts.{e}.",
            lambda d: d.moe_intermediate,
            "moe",
            PER_EXPERT,
        ),
        _rule(
            "mlp.experts.gate_up_proj",
            None,
            lambda d: (d.n_routed_experts, 2 * d.moe_intermediate, d.hidden),
            "moe",
            FUSED,
        ),
        _rule(
            "mlp.experts.down_proj",
            None,
            lambda d: (d.n_routed_experts, d.hidden, d.moe_intermediate),
            "moe",
            FUSED,
        ),
        *_gated_mlp(
            "mlp.shared_experts.",
            "mlp.shared_experts.",
            lambda d: d.moe_intermediate * d.n_shared_experts,
            "moe",
            "shared_experts",
        ),
    ),
    mtp=(
        _norm("enorm.weight", "enorm.weight", lambda d: (d.hidden,)),
        _norm("hnorm.weight", "hnorm.weight", lambda d: (d.hidden,)),
        _linear("eh_proj", "eh_proj", lambda d: (d.hidden, 2 * d.hidden)),
        _norm("shared_head.norm.weight", "final_layernorm.weight", lambda d: (d.hidden,)),
        # The MTP embedding and head are the trunk's; some releases store copies.
        _rule("embed_tokens.weight", None, lambda d: (d.vocab, d.hidden), optional=True),
        _rule("shared_head.head.weight", None, lambda d: (d.vocab, d.hidden), optional=True),
    ),
    tail=(
        _norm("model.norm.weight", "decoder.final_layernorm.weight", lambda d: (d.hidden,)),
        _rule("lm_head.weight", "output_layer.weight", lambda d: (d.vocab, d.hidden), "untied"),
    ),
)


@dataclass(frozen=True)
class LayerKind:
    """What decides which rules apply to one layer: its schedule role and MLP kind."""

    full: bool
    moe: bool
    expert_format: str = PER_EXPERT


@dataclass(frozen=True)
class TensorEntry:
    """One Megatron tensor (or HF-only tensor) of a concrete model, with its HF part(s)."""

    hf: tuple[str, ...]
    megatron: str | None
    #: Shape of each HF part.
    shape: tuple[int, ...]
    layer: int | None
    rule: TensorRule


def model_tensors(
    family: ModelFamily, dims: CheckpointDims, layers: Sequence[LayerKind], num_layers: int
) -> Iterator[TensorEntry]:
    """Every tensor of a model in checkpoint order; ``layers`` covers trunk then MTP layers.

    MTP layer ``k`` is HF ``model.layers.{num_layers + k}`` and Megatron ``mtp.layers.{k}``
    (its decoder layer under ``mtp_model_layer.``).
    """
    table = family.tensors
    yield from _expand(table.head, dims, _config_flags(dims), "", "", None)
    for i, kind in enumerate(layers):
        yield from layer_tensors(family, dims, i, kind, num_layers)
    yield from _expand(table.tail, dims, _config_flags(dims), "", "", None)


def layer_tensors(
    family: ModelFamily, dims: CheckpointDims, layer: int, kind: LayerKind, num_layers: int
) -> Iterator[TensorEntry]:
    """The tensors of global layer ``layer`` (an MTP layer when ``layer >= num_layers``)."""
    flags = _config_flags(dims) | {"moe" if kind.moe else "dense", kind.expert_format}
    if kind.full:
        flags.add("full")
    hf = f"model.layers.{layer}."
    mtp = f"mtp.layers.{layer - num_layers}."
    mg = mtp + "mtp_model_layer." if layer >= num_layers else f"decoder.layers.{layer}."
    yield from _expand(family.tensors.layer, dims, flags, mg, hf, layer)
    if layer >= num_layers:
        yield from _expand(family.tensors.mtp, dims, flags, mtp, hf, layer)


def _config_flags(dims: CheckpointDims) -> set[str]:
    flags = {"q_lora" if dims.q_lora_rank is not None else "no_q_lora"}
    if dims.attention_bias:
        flags.add("bias")
    if dims.n_shared_experts:
        flags.add("shared_experts")
    if not dims.tie_word_embeddings:
        flags.add("untied")
    return flags


def _expand(
    rules: Sequence[TensorRule],
    dims: CheckpointDims,
    flags: set[str],
    mg_prefix: str,
    hf_prefix: str,
    layer: int | None,
) -> Iterator[TensorEntry]:
    """Applicable rules in order; a run of per-expert rules repeats expert by expert."""
    runs: list[list[TensorRule]] = []
    for rule in (r for r in rules if r.when <= flags):
        if runs and rule.per_expert and runs[-1][0].per_expert:
            runs[-1].append(rule)
        else:
            runs.append([rule])
    for run in runs:
        for e in range(dims.n_routed_experts) if run[0].per_expert else [None]:
            for rule in run:
                fmt = (lambda s: s) if e is None else (lambda s, e=e: s.format(e=e))
                yield TensorEntry(
                    tuple(hf_prefix + fmt(h) for h in rule.hf),
                    None if rule.megatron is None else mg_prefix + fmt(rule.megatron),
                    rule.shape(dims),
                    layer,
                    rule,
                )
