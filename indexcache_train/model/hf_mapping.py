"""The Megatron <-> Hugging Face tensor names of a :class:`ModelConfig`, and in-memory copies.

The names come from the family's tensor table (:mod:`indexcache_train.model.tensor_rules`, shared
with the checkpoint tools' layout): HF names are the checkpoint-file names of the releases
(per-expert MoE tensors ``mlp.experts.{e}.{gate,up,down}_proj.weight``; transformers 5.17 fuses
them in memory on load and splits them again on save). Megatron names use *global* layer indices
(as Megatron's sharded state dicts do); :func:`load_hf_state_dict` translates to a pipeline
stage's local names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from indexcache_train.model.config import ModelConfig
from indexcache_train.model.tensor_rules import CheckpointDims, LayerKind, model_tensors


@dataclass(frozen=True)
class TensorMapping:
    """One Megatron tensor and the HF tensor(s) it is made of."""

    megatron: str
    hf: tuple[str, ...]
    layer: int | None = None
    #: Kept in fp32 whatever the export dtype (transformers ``_keep_in_fp32_modules``).
    fp32: bool = False

    @property
    def is_concat(self) -> bool:
        return len(self.hf) > 1


def mappings(cfg: ModelConfig) -> Iterator[TensorMapping]:
    """Every tensor of the model, in checkpoint order (global Megatron names)."""
    family = cfg.family_record
    dims = CheckpointDims.from_config(cfg.to_hf_config(), family)
    layers = [
        LayerKind(full=cfg.schedule.is_full(i), moe=cfg.is_moe_layer(i))
        for i in range(cfg.num_layers + cfg.num_mtp_layers)
    ]
    for entry in model_tensors(family, dims, layers, cfg.num_layers):
        if entry.megatron is not None:
            yield TensorMapping(entry.megatron, entry.hf, entry.layer, entry.rule.fp32)
        elif not entry.rule.optional:  # ModelConfig rejects configs that need such tensors
            raise ValueError(f"the trainer has no parameter for HF tensor {entry.hf[0]}")


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
