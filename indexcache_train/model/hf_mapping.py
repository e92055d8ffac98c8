"""The Megatron <-> Hugging Face tensor-name table (one declarative table, used everywhere).

HF names are the checkpoint-file names of the GLM-5 / DeepSeek-V3.2 releases (per-expert MoE
tensors ``mlp.experts.{e}.{gate,up,down}_proj.weight``; transformers 5.17 fuses them in memory on
load and splits them again on save). Megatron names use *global* layer indices (as Megatron's
sharded state dicts do); :func:`load_hf_state_dict` translates to a pipeline stage's local names.

* Shared layers map no indexer tensors (they have none on either side).
* MTP layer ``k`` <-> ``model.layers.{N+k}`` with ``enorm``, ``hnorm``, ``eh_proj`` and
  ``shared_head.norm`` (= Megatron's MTP ``final_layernorm``); the MTP embedding and head are
  shared with the trunk and are not stored.
* Gated MLPs: Megatron's ``linear_fc1`` is ``cat([gate_proj; up_proj], dim=0)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from indexcache_train.model.config import ModelConfig


@dataclass(frozen=True)
class _Rule:
    megatron: str
    #: One HF tensor, or several concatenated along dim 0 (in this order) into the Megatron one.
    hf: tuple[str, ...]
    #: Which layers have it: "all", "full" (indexer), "dense" (dense MLP), "moe".
    when: str = "all"
    per_expert: bool = False


_ATTN = "self_attention."
_LAYER_RULES: tuple[_Rule, ...] = (
    _Rule("input_layernorm.weight", ("input_layernorm.weight",)),
    _Rule(_ATTN + "linear_q_down_proj.weight", ("self_attn.q_a_proj.weight",)),
    _Rule(_ATTN + "q_layernorm.weight", ("self_attn.q_a_layernorm.weight",)),
    _Rule(_ATTN + "linear_q_up_proj.weight", ("self_attn.q_b_proj.weight",)),
    _Rule(_ATTN + "linear_kv_down_proj.weight", ("self_attn.kv_a_proj_with_mqa.weight",)),
    _Rule(_ATTN + "kv_layernorm.weight", ("self_attn.kv_a_layernorm.weight",)),
    _Rule(_ATTN + "linear_kv_up_proj.weight", ("self_attn.kv_b_proj.weight",)),
    _Rule(_ATTN + "linear_proj.weight", ("self_attn.o_proj.weight",)),
    _Rule(
        _ATTN + "core_attention.indexer.linear_wq_b.weight",
        ("self_attn.indexer.wq_b.weight",),
        "full",
    ),
    _Rule(
        _ATTN + "core_attention.indexer.linear_wk.weight", ("self_attn.indexer.wk.weight",), "full"
    ),
    _Rule(
        _ATTN + "core_attention.indexer.k_norm.weight", ("self_attn.indexer.k_norm.weight",), "full"
    ),
    _Rule(_ATTN + "core_attention.indexer.k_norm.bias", ("self_attn.indexer.k_norm.bias",), "full"),
    _Rule(
        _ATTN + "core_attention.indexer.linear_weights_proj.weight",
        ("self_attn.indexer.weights_proj.weight",),
        "full",
    ),
    _Rule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)),
    _Rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "dense"),
    _Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "dense"),
    _Rule("mlp.router.weight", ("mlp.gate.weight",), "moe"),
    _Rule("mlp.router.expert_bias", ("mlp.gate.e_score_correction_bias",), "moe"),
    _Rule(
        "mlp.experts.local_experts.{e}.linear_fc1.weight",
        ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
        "moe",
        per_expert=True,
    ),
    _Rule(
        "mlp.experts.local_experts.{e}.linear_fc2.weight",
        ("mlp.experts.{e}.down_proj.weight",),
        "moe",
        per_expert=True,
    ),
    _Rule(
        "mlp.shared_experts.linear_fc1.weight",
        ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
        "moe",
    ),
    _Rule("mlp.shared_experts.linear_fc2.weight", ("mlp.shared_experts.down_proj.weight",), "moe"),
)
_MTP_RULES: tuple[_Rule, ...] = (
    _Rule("enorm.weight", ("enorm.weight",)),
    _Rule("hnorm.weight", ("hnorm.weight",)),
    _Rule("eh_proj.weight", ("eh_proj.weight",)),
    _Rule("final_layernorm.weight", ("shared_head.norm.weight",)),
)

#: HF tensors that stay fp32 in every dtype conversion (HF ``_keep_in_fp32_modules``).
FP32_HF_SUFFIXES = ("self_attn.indexer.weights_proj.weight", "mlp.gate.e_score_correction_bias")


@dataclass(frozen=True)
class TensorMapping:
    """One Megatron tensor and the HF tensor(s) it is made of."""

    megatron: str
    hf: tuple[str, ...]
    layer: int | None = None

    @property
    def is_concat(self) -> bool:
        return len(self.hf) > 1


def _applies(rule: _Rule, cfg: ModelConfig, layer: int) -> bool:
    if rule.when == "full":
        return cfg.schedule.is_full(layer)
    if rule.when == "dense":
        return not cfg.is_moe_layer(layer)
    if rule.when == "moe":
        return cfg.is_moe_layer(layer)
    return True


def _layer_mappings(
    cfg: ModelConfig, layer: int, mg_prefix: str, hf_prefix: str
) -> Iterator[TensorMapping]:
    for rule in _LAYER_RULES:
        if not _applies(rule, cfg, layer):
            continue
        experts = range(cfg.n_routed_experts) if rule.per_expert else [None]
        for e in experts:
            fmt = (lambda s, e=e: s.format(e=e)) if e is not None else (lambda s: s)
            yield TensorMapping(
                mg_prefix + fmt(rule.megatron), tuple(hf_prefix + fmt(h) for h in rule.hf), layer
            )


def mappings(cfg: ModelConfig) -> Iterator[TensorMapping]:
    """Every tensor of the model, in a stable order (global Megatron names)."""
    yield TensorMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",))
    for i in range(cfg.num_layers):
        yield from _layer_mappings(cfg, i, f"decoder.layers.{i}.", f"model.layers.{i}.")
    yield TensorMapping("decoder.final_layernorm.weight", ("model.norm.weight",))
    if not cfg.tie_word_embeddings:
        yield TensorMapping("output_layer.weight", ("lm_head.weight",))
    for k in range(cfg.num_mtp_layers):
        g = cfg.num_layers + k
        hf_prefix = f"model.layers.{g}."
        for rule in _MTP_RULES:
            yield TensorMapping(f"mtp.layers.{k}." + rule.megatron, (hf_prefix + rule.hf[0],), g)
        yield from _layer_mappings(cfg, g, f"mtp.layers.{k}.mtp_model_layer.", hf_prefix)


def hf_tensor_names(cfg: ModelConfig) -> list[str]:
    """The exact set of HF tensor names a checkpoint of ``cfg`` holds (no indexer on Shared layers)."""
    return [h for m in mappings(cfg) for h in m.hf]


def to_megatron_tensor(m: TensorMapping, get_hf: Callable[[str], torch.Tensor]) -> torch.Tensor:
    parts = [get_hf(h) for h in m.hf]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def to_hf_tensors(m: TensorMapping, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    if not m.is_concat:
        return {m.hf[0]: tensor}
    chunks = torch.chunk(tensor, len(m.hf), dim=0)
    return dict(zip(m.hf, chunks))


# ---------------------------------------------------------------------- in-memory copies
def _local_name_map(model: torch.nn.Module) -> dict[str, str]:
    """Global Megatron name -> this stage's module name (``decoder.layers.{local}``)."""
    out: dict[str, str] = {}
    decoder = getattr(model, "decoder", None)
    names = dict(model.named_parameters())
    names.update({n: b for n, b in model.named_buffers()})
    for local_name in names:
        name = local_name
        if decoder is not None and local_name.startswith("decoder.layers."):
            j, rest = local_name[len("decoder.layers.") :].split(".", 1)
            name = f"decoder.layers.{decoder.layers[int(j)].layer_number - 1}.{rest}"
        out[name] = local_name
    return out


def _check_single_shard(model: torch.nn.Module) -> None:
    tp = getattr(getattr(model, "pg_collection", None), "tp", None)
    if tp is not None and tp.size() > 1:
        raise ValueError(
            "in-memory HF copies need tensor_model_parallel_size=1; use "
            "`python -m checkpoint_tools import/export` for sharded models"
        )


@torch.no_grad()
def load_hf_state_dict(
    model: torch.nn.Module, cfg: ModelConfig, hf: Mapping[str, torch.Tensor]
) -> None:
    """Copy HF tensors into this (TP=1) pipeline stage; every tensor of the stage must be present."""
    _check_single_shard(model)
    local = _local_name_map(model)
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    missing = [h for m in mappings(cfg) if m.megatron in local for h in m.hf if h not in hf]
    if missing:
        raise KeyError(
            f"HF state dict lacks {len(missing)} tensor(s) this model needs, e.g. {missing[:5]}"
        )
    seen = set()
    for m in mappings(cfg):
        if m.megatron not in local:
            continue  # lives on another pipeline stage
        dst = targets[local[m.megatron]]
        src = to_megatron_tensor(m, hf.__getitem__)
        if src.shape != dst.shape:
            raise ValueError(
                f"{m.hf} -> {m.megatron}: shape {tuple(src.shape)} != {tuple(dst.shape)}"
            )
        dst.copy_(src.to(dst.dtype))
        seen.add(local[m.megatron])
    unfilled = [n for n in dict(model.named_parameters()) if n not in seen]
    if unfilled:
        raise KeyError(f"model parameters not covered by the HF mapping: {unfilled[:5]}")


@torch.no_grad()
def export_hf_state_dict(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """This (TP=1) stage's tensors under HF names (split concatenations, fp32 kept fp32)."""
    _check_single_shard(model)
    local = _local_name_map(model)
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    out: dict[str, torch.Tensor] = {}
    for m in mappings(cfg):
        if m.megatron in local:
            out.update(to_hf_tensors(m, tensors[local[m.megatron]].detach().clone()))
    return out
