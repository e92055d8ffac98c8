"""Fill one Megatron pipeline stage from an HF checkpoint, reading only this rank's slices.

For every tensor the stage will save (``state_dict``: parameters and persistent buffers such as
the router's ``expert_bias``):

1. Local name -> global name: decoder layers carry their global number in ``layer_number``;
   routed experts are ``local_experts.{i}`` on this EP rank, global expert
   ``ep_rank * num_local_experts + i`` (Megatron's ``SequentialMLP``).
2. Global name -> HF tensor(s) with the mapping table (``indexcache_train.model.hf_mapping``).
3. Tensor-parallel parameters (``tensor_model_parallel`` / ``partition_dim``, set by Megatron's
   parallel linears and vocab-parallel embedding) get rank ``r`` of ``n`` equal pieces along
   ``partition_dim``; experts use the expert-TP group, everything else the TP group. Each HF part
   of a concatenated tensor is sliced on its own: the local gated ``linear_fc1`` is
   ``[gate_r; up_r]``, not the r-th piece of ``[gate; up]`` (Megatron's swiglu sharding, which
   ``partition_stride=2`` on expert ``linear_fc1`` also records).

FP8 weights are dequantised (block-aligned slices) straight into the parameter dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from checkpoint_tools.errors import CheckpointError, ShapeMismatchError
from checkpoint_tools.fp8 import is_fp8, read_dequantized, read_dequantized_slice
from checkpoint_tools.hf_io import HFCheckpoint
from checkpoint_tools.progress import Progress
from indexcache_train.model.config import ModelConfig
from indexcache_train.model.hf_mapping import TensorMapping, mappings

_DECODER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


@dataclass(frozen=True)
class StageSharding:
    """This rank's place in the groups that split tensors: (rank, size) pairs and EP offset."""

    tp: tuple[int, int] = (0, 1)
    etp: tuple[int, int] = (0, 1)
    expert_offset: int = 0

    @classmethod
    def from_parallel_state(cls, num_experts: int) -> StageSharding:
        from megatron.core import parallel_state as ps

        ep_rank, ep_size = (
            ps.get_expert_model_parallel_rank(),
            ps.get_expert_model_parallel_world_size(),
        )
        return cls(
            tp=(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
            etp=(ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
            expert_offset=ep_rank * (num_experts // ep_size),
        )


@dataclass
class FillReport:
    """What :func:`fill_stage` read."""

    tensors: int = 0
    bytes: int = 0
    hf_tensors: set[str] = field(default_factory=set)
    fp8_dequantized: int = 0
    #: HF tensors stored wider than the parameter they were cast into (e.g. F32 into bf16).
    narrowed: list[str] = field(default_factory=list)


def global_name(model: torch.nn.Module, local_name: str, expert_offset: int) -> str:
    """The mapping table's (global) name of a stage-local state-dict entry."""
    name = local_name
    match = _DECODER_LAYER.match(name)
    if match:
        layer = model.decoder.layers[int(match.group(1))].layer_number - 1
        name = f"decoder.layers.{layer}." + name[match.end() :]
    match = _LOCAL_EXPERT.search(name)
    if match:
        expert = int(match.group(1)) + expert_offset
        name = f"{name[: match.start()]}.mlp.experts.local_experts.{expert}.{name[match.end() :]}"
    return name


@torch.no_grad()
def fill_stage(
    model: torch.nn.Module,
    cfg: ModelConfig,
    ckpt: HFCheckpoint,
    sharding: StageSharding,
    progress: Progress,
) -> FillReport:
    """Copy every saved tensor of this stage from ``ckpt`` (exact for same-dtype tensors)."""
    table = {m.megatron: m for m in mappings(cfg)}
    report = FillReport()
    for local_name, target in model.state_dict(keep_vars=True).items():
        if local_name.endswith("_extra_state"):
            continue
        name = global_name(model, local_name, sharding.expert_offset)
        mapping = table.get(name)
        if mapping is None:
            raise CheckpointError(
                f"model tensor {name} has no HF source in the mapping table",
                fix="this is a bug: extend indexcache_train/model/hf_mapping.py",
            )
        source = _read_local_piece(ckpt, mapping, target, sharding)
        if tuple(source.shape) != tuple(target.shape):
            raise ShapeMismatchError(
                f"HF {list(mapping.hf)} give shape {list(source.shape)} for {name}, whose local "
                f"shape is {list(target.shape)}",
                file=str(ckpt.path),
                tensor=mapping.hf[0],
                fix="the checkpoint does not match its config.json",
            )
        target.data.copy_(source)
        report.tensors += 1
        report.bytes += target.numel() * target.element_size()
        report.hf_tensors.update(mapping.hf)
        for hf_name in mapping.hf:
            info = ckpt.info(hf_name)
            if is_fp8(info.dtype):
                report.fp8_dequantized += 1
            elif info.nbytes // max(info.numel, 1) > target.element_size():
                report.narrowed.append(hf_name)
        progress.update(target.numel() * target.element_size())
    return report


def _read_local_piece(
    ckpt: HFCheckpoint, mapping: TensorMapping, target: torch.Tensor, sharding: StageSharding
) -> torch.Tensor:
    dtype = target.dtype
    if not getattr(target, "tensor_model_parallel", False):
        parts = [read_dequantized(ckpt, h, dtype) for h in mapping.hf]
    else:
        dim = target.partition_dim
        rank, size = sharding.etp if _LOCAL_EXPERT.search(mapping.megatron) else sharding.tp
        parts = []
        for hf_name in mapping.hf:
            full = ckpt.info(hf_name).shape[dim]
            if full % size:
                raise ShapeMismatchError(
                    f"dim {dim} of size {full} does not split into {size} equal TP pieces",
                    file=str(ckpt.path),
                    tensor=hf_name,
                    fix="choose a --tp that divides this dimension",
                )
            step = full // size
            parts.append(
                read_dequantized_slice(ckpt, hf_name, dim, rank * step, (rank + 1) * step, dtype)
            )
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
