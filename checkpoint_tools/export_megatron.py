"""``export``: Megatron ``torch_dist`` checkpoint -> HF safetensors checkpoint, streaming.

    python -m checkpoint_tools export --ckpt MEGATRON_DIR|RUN_DIR --out HF_DIR [--dtype D] \\
        [--hf-ref HF_DIR] [--shard-size 5GB] [--overwrite]

``--ckpt`` may also be a training run (or its ``checkpoints/``): its ``latest`` checkpoint is
exported.

One process, never the whole model in memory, at whatever layout the checkpoint was saved:

1. ``model_config.yaml`` rebuilds the :class:`ModelConfig`; the mapping table lists every HF
   tensor and the Megatron parameter it comes from (no indexer on Shared layers; MTP layer ``k``
   as ``model.layers.{N+k}``; per-expert names; ``linear_fc1`` split into gate / up).
2. The checkpoint's own DCP metadata gives each parameter's sharded key and global shape
   (:mod:`checkpoint_tools.dcp_reader`); every tensor the table needs is checked to exist with a
   consistent shape, and every stored model tensor to be needed, before anything is written.
3. Parameters are read in batches of at most ``--batch-size`` bytes (one expert at a time for the
   stacked expert tensors), cast to ``--dtype`` (default: the dtype the checkpoint stores;
   ``weights_proj`` and ``e_score_correction_bias`` stay fp32) and written by :class:`ShardedCheckpointWriter` (sized shards, index json, atomic
   rename after the output passed ``validate_hf_checkpoint``).

config.json is the stored config with the schedule keys exactly as ``ModelConfig.to_hf_config()``
writes them and ``dtype`` set to the export dtype. Tokenizer / generation files come from
``--hf-ref``, else from the HF model the checkpoint records (``import``'s source, the run's
``model.hf_path`` or HF tokenizer directory); without one the export warns that it has no tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from checkpoint_tools.dcp_reader import ShardedLocation, TorchDistCheckpoint, sharded_location
from checkpoint_tools.errors import (
    ConfigError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
)
from checkpoint_tools.hf_io import (
    CONFIG_NAME,
    ShardedCheckpointWriter,
    check_output_dir,
    copy_side_files,
    parse_size,
)
from checkpoint_tools.layout import expected_tensors, family_of
from checkpoint_tools.megatron_dir import (
    DTYPES,
    MODEL_CONFIG_NAME,
    TOKENIZER_FILES,
    read_model_config,
    resolve_checkpoint_dir,
    resolve_model_config,
    side_file_source,
)
from checkpoint_tools.safetensors_format import TensorSpec, dtype_string, torch_dtype
from checkpoint_tools.schedule_plan import check_family_support
from checkpoint_tools.validation import validate_hf_checkpoint
from indexcache_train.model.config import ModelConfig
from indexcache_train.model.hf_mapping import TensorMapping, mappings

#: Stored keys that hold model tensors (trainer checkpoints also hold optimizer state, RNG, ...).
_MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")


@dataclass(frozen=True)
class _Item:
    """One Megatron parameter to export and the HF tensors it becomes."""

    mapping: TensorMapping
    location: ShardedLocation
    specs: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote and decided (the CLI prints it)."""

    checkpoint: Path
    config: dict[str, Any]
    dtype: str
    #: How the dtype was chosen (``--dtype`` or the checkpoint's own).
    dtype_reason: str
    side_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def export_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    hf_ref: str | os.PathLike[str] | None = None,
    shard_size: int | str = "5GB",
    batch_size: int | str = "2GB",
    overwrite: bool = False,
    allow_transformers_incompatible: bool = False,
    progress: bool = False,
) -> ExportResult:
    """Write the HF checkpoint of a Megatron checkpoint (or a run's latest one).

    Args:
        dtype: tensor dtype (``bfloat16`` / ``float16`` / ``float32``); None: the checkpoint's.
        hf_ref: HF directory to copy tokenizer / generation files from; None: the one the
            checkpoint records, if any.
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite)  # before any work
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} unsupported; use one of {sorted(DTYPES)}")
    if hf_ref is not None and not Path(hf_ref).is_dir():
        raise ConfigError(
            "--hf-ref is not a directory", file=str(hf_ref), fix="point it at the HF source"
        )
    ckpt_dir, followed = resolve_checkpoint_dir(ckpt_dir)
    stored_config, model = read_model_config(ckpt_dir)
    cfg_file = str(Path(ckpt_dir) / MODEL_CONFIG_NAME)
    check_family_support(
        family_of(stored_config, cfg_file),
        model.schedule,
        allow_transformers_incompatible,
        cfg_file,
    )
    source = TorchDistCheckpoint(ckpt_dir)
    result = ExportResult(ckpt_dir, {}, *_export_dtype(source, model, dtype))
    result.notes += [followed] if followed else []
    # Schedule keys exactly as written on import (IndexCacheSchedule.to_hf_config via
    # ModelConfig.to_hf_config); the stored weights' dtype is the export dtype.
    config = {**resolve_model_config(stored_config, model.schedule, cfg_file)[0]}
    result.config = config = {**config, "dtype": result.dtype}
    items = _plan(source, model, DTYPES[result.dtype])
    order = {name: i for i, name in enumerate(expected_tensors(config, model.schedule))}
    specs = sorted((s for item in items for s in item.specs), key=lambda s: order.get(s.name, -1))
    with ShardedCheckpointWriter(
        out,
        specs,
        max_shard_size=shard_size,
        overwrite=overwrite,
        progress=progress,
        before_commit=lambda tmp: validate_hf_checkpoint(tmp).raise_if_errors(),
    ) as writer:
        writer.write_json(CONFIG_NAME, config)
        side, why = (Path(hf_ref), "--hf-ref") if hf_ref is not None else side_file_source(ckpt_dir)
        if side is not None:
            result.side_files = copy_side_files(side, writer, skip=(CONFIG_NAME,))
            result.notes.append(f"side files from {why}: {', '.join(result.side_files) or 'none'}")
        if not any(name in TOKENIZER_FILES for name in result.side_files):
            result.warnings.append(
                f"no tokenizer in the export ({why if side is None else f'none in {side}'}): "
                "serving engines need one. Fix: pass --hf-ref HF_DIR (the HF model the run "
                "started from) or copy its tokenizer files into the output"
            )
        for item, tensor in _stream(source, items, parse_size(batch_size)):
            parts = torch.chunk(tensor, len(item.specs), dim=0)
            for spec, part in zip(item.specs, parts):
                writer.write_tensor(spec.name, part.to(torch_dtype(spec.dtype)).contiguous())
    return result


def _export_dtype(
    source: TorchDistCheckpoint, model: ModelConfig, requested: str | None
) -> tuple[str, str]:
    """``(dtype, reason)``: ``--dtype`` when given, else the one the checkpoint stores."""
    if requested is not None:
        return requested, "--dtype"
    names = {v: k for k, v in DTYPES.items()}
    stored = set()
    for m in mappings(model):
        loc = sharded_location(m.megatron)
        if not m.fp32 and source.shape(loc) is not None:
            stored.add(source.dtype(loc))
    if len(stored) != 1 or next(iter(stored)) not in names:
        raise ConfigError(
            f"the checkpoint stores its weights in {sorted(map(str, stored))}, not one of "
            f"{sorted(DTYPES)}",
            file=str(source.path),
            fix="pass --dtype to choose the export dtype",
        )
    return names[stored.pop()], "the checkpoint's own dtype"


def _plan(source: TorchDistCheckpoint, model: ModelConfig, dtype: torch.dtype) -> list[_Item]:
    """Every parameter to export, checked against the stored keys and shapes (no data read)."""
    items, used = [], set()
    for m in mappings(model):
        loc = sharded_location(m.megatron)
        shape = source.shape(loc)
        if shape is None:
            raise MissingTensorError(
                f"the checkpoint has no {loc.key}"
                + (f"[{loc.index[0]}]" if loc.index else "")
                + f" (Megatron parameter {m.megatron})",
                file=str(source.path),
                tensor=m.megatron,
                fix=f"{MODEL_CONFIG_NAME} does not describe this checkpoint (other schedule or "
                "size?), or the checkpoint is incomplete",
            )
        if shape[0] % len(m.hf):
            raise ShapeMismatchError(
                f"stored shape {list(shape)} does not split into {list(m.hf)}",
                file=str(source.path),
                tensor=m.megatron,
            )
        part = (shape[0] // len(m.hf), *shape[1:])
        part_dtype = dtype_string(torch.float32 if m.fp32 else dtype)
        specs = tuple(TensorSpec(h, part_dtype, part) for h in m.hf)
        items.append(_Item(m, loc, specs))
        used.add(loc.key)
    extra = [k for k in source.keys if k.startswith(_MODEL_KEY_PREFIXES) and k not in used]
    if extra:
        raise UnexpectedTensorError(
            f"{len(extra)} stored model tensor(s) are not part of the model {MODEL_CONFIG_NAME} "
            f"describes (first: {extra[0]})",
            file=str(source.path),
            tensor=extra[0],
            fix=f"{MODEL_CONFIG_NAME} belongs to another model (schedule, layers, MTP depth?)",
        )
    return items


def _stream(
    source: TorchDistCheckpoint, items: list[_Item], batch_bytes: int
) -> Iterator[tuple[_Item, torch.Tensor]]:
    """``(item, tensor)`` in order, reading batches of at most ``batch_bytes`` (one item at least)."""
    batch: list[_Item] = []
    size = 0
    for item in [*items, None]:
        if item is None or (batch and size + item.nbytes > batch_bytes):
            tensors = source.read([b.location for b in batch])
            yield from zip(batch, tensors)
            batch, size = [], 0
        if item is not None:
            batch.append(item)
            size += item.nbytes


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register this verb's flags."""
    parser.add_argument(
        "--ckpt",
        required=True,
        type=Path,
        help="Megatron checkpoint directory, or a run (its latest checkpoint)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output HF directory")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="tensor dtype (default: the checkpoint's own)"
    )
    parser.add_argument(
        "--hf-ref",
        type=Path,
        help="HF directory to copy tokenizer files from (default: the one the checkpoint records)",
    )
    parser.add_argument("--shard-size", default="5GB", help="max shard size (default 5GB)")
    parser.add_argument(
        "--batch-size", default="2GB", help="bytes of parameters read per checkpoint pass"
    )
    parser.add_argument(
        "--allow-transformers-incompatible",
        action="store_true",
        help="export Shared layers of a deepseek_v32 model (transformers 5.17 cannot load them)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Run the verb; errors propagate to the dispatcher, which prints them."""
    result = export_checkpoint(
        args.ckpt,
        args.out,
        dtype=args.dtype,
        hf_ref=args.hf_ref,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        allow_transformers_incompatible=args.allow_transformers_incompatible,
        progress=not args.no_progress,
    )
    for note in result.notes:
        print(f"note: {note}")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    config = result.config
    print(
        f"wrote {args.out} ({config['model_type']}, {result.dtype} = {result.dtype_reason}, "
        f"{config['num_hidden_layers']} layers) from {result.checkpoint}"
    )
    return 0
