"""``import``: HF checkpoint -> Megatron ``torch_dist`` checkpoint (+ ``model_config.yaml``).

    python -m checkpoint_tools import --hf HF_DIR --out MEGATRON_DIR [--tp N --pp N --ep N] \\
        [--index-topk-freq N --index-skip-topk-offset M | --pattern FSS...] \\
        [--drop-shared-indexers] [--dtype bfloat16] [--overwrite]
    torchrun --nproc-per-node 8 -m checkpoint_tools import --hf GLM-5 --out GLM-5-mcore --tp 8 --ep 8

One process imports small models; large ones run under ``torchrun`` at the target layout (world
size = PP x lcm(TP, EP); see :mod:`checkpoint_tools.megatron_runtime`). Every rank:

1. validates the HF checkpoint against the requested schedule (headers only; every bad input is
   reported here, before anything is built or written);
2. builds only its pipeline stage, uninitialised (:func:`megatron_runtime.build_stage`);
3. fills it reading only its TP / EP slices from the shards (:mod:`checkpoint_tools.stage_loader`;
   FP8 weights dequantised to the parameter dtype);
4. saves with ``dist_checkpointing.save(model.sharded_state_dict(), tmp)`` into a temporary
   sibling of ``--out``; rank 0 adds ``model_config.yaml`` and ``import_metadata.json`` and renames
   it into place after a barrier (:mod:`checkpoint_tools.megatron_dir` has the layout).

The schedule flags select the Megatron model's schedule: Shared layers are built without
indexers, so an all-Full GLM-5 imported at ``--index-topk-freq 4 --index-skip-topk-offset 3``
needs ``--drop-shared-indexers`` (its Shared layers' indexers are dropped), and a layer that
becomes Full must have an indexer in the checkpoint (else run ``convert-schedule`` first).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from checkpoint_tools import megatron_runtime as rt
from checkpoint_tools.errors import (
    ConfigError,
    ConfigScheduleMismatchError,
    OutputExistsError,
    ParallelLayoutError,
)
from checkpoint_tools.hf_io import (
    CONFIG_NAME,
    HFCheckpoint,
    check_output_dir,
    make_tmp_dir,
    move_into_place,
)
from checkpoint_tools.layout import family_of
from checkpoint_tools.megatron_dir import (
    DTYPES,
    FORMAT,
    IMPORT_METADATA_NAME,
    resolve_model_config,
    truncated_config,
    write_json,
    write_model_config,
)
from checkpoint_tools.megatron_runtime import ParallelLayout, launch_world_size
from checkpoint_tools.progress import make_progress
from checkpoint_tools.schedule_plan import ScheduleRequest
from checkpoint_tools.stage_loader import FillReport, StageSharding, fill_stage
from checkpoint_tools.validation import schedule_from_config, validate_hf_checkpoint
from indexcache_train.model.config import ModelConfig
from indexcache_train.schedule import ScheduleError


@dataclass
class ImportPlan:
    """Everything decided (and checked) before a model is built."""

    checkpoint: HFCheckpoint
    hf_config: dict[str, Any]
    model: ModelConfig
    dtype: str
    notes: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def plan_import(
    ckpt: HFCheckpoint,
    request: ScheduleRequest | None = None,
    *,
    drop_shared_indexers: bool = False,
    dtype: str | None = None,
    num_layers: int | None = None,
) -> ImportPlan:
    """Validate ``ckpt`` for the requested schedule and resolve the model config; reads headers only.

    Args:
        ckpt: the HF checkpoint.
        request: the Megatron model's schedule; None keeps the config's.
        drop_shared_indexers: accept (and skip) indexers on layers the schedule makes Shared.
        dtype: parameter dtype (``bfloat16`` / ``float16`` / ``float32``); None: config.json's.
        num_layers: import only the first ``num_layers`` trunk layers and no MTP (``verify``).
    """
    config, cfg_file = ckpt.config, str(ckpt.path / CONFIG_NAME)
    family = family_of(config, cfg_file)
    if not family.has_indexers:
        raise ConfigError(
            f"{family.model_type} is a dense-MLA model; the trainer builds DSA models only",
            file=cfg_file,
            fix=f"run `checkpoint_tools convert-schedule` first (it adds indexers, giving "
            f"{family.dsa_model_type})",
        )
    n, num_mtp = int(config["num_hidden_layers"]), int(config.get("num_nextn_predict_layers") or 0)
    if request is None:
        schedule = schedule_from_config(config, family, cfg_file)
    else:
        try:
            schedule = request.build(n, num_mtp, bool(config.get("index_share_for_mtp_iteration")))
        except ScheduleError as exc:
            raise ConfigScheduleMismatchError(
                f"requested schedule does not fit this model ({n} layers + {num_mtp} MTP): {exc}",
                file=cfg_file,
            ) from exc
    assert schedule is not None  # DSA families always have one
    hf_config, model, notes = resolve_model_config(config, schedule, cfg_file)
    report = validate_hf_checkpoint(
        ckpt, schedule=model.schedule, drop_shared_indexers=drop_shared_indexers
    )
    report.raise_if_errors()
    if num_layers is not None:
        small = truncated_config(hf_config, model, num_layers)
        small_schedule = schedule_from_config(small, family, cfg_file)
        assert small_schedule is not None
        hf_config, model, _ = resolve_model_config(small, small_schedule, cfg_file)
    if dtype is None:  # the config's (FP8 releases say bfloat16: what they dequantise to)
        named = config.get("dtype") or config.get("torch_dtype")
        dtype = named if named in DTYPES else "bfloat16"
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} unsupported; use one of {sorted(DTYPES)}")
    return ImportPlan(
        ckpt, hf_config, model, dtype, notes + report.notes, report.shared_layer_indexers
    )


@dataclass
class ImportResult:
    """What :func:`run_import` wrote (the same on every rank)."""

    out_dir: Path
    metadata: dict[str, Any]


def run_import(
    plan: ImportPlan,
    out_dir: str | os.PathLike[str],
    layout: ParallelLayout | None = None,
    *,
    pipeline_layout: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> ImportResult:
    """Build, fill and save this rank's stage; rank 0 commits the directory (see module doc)."""
    layout = layout or ParallelLayout()
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    if out.resolve() == plan.checkpoint.path.resolve():
        raise OutputExistsError(
            "output is the input", file=str(out), fix="write to a new directory"
        )
    layout.check(launch_world_size(), plan.model)
    pipeline_layout = pipeline_layout_for(plan.model, layout, pipeline_layout)
    rt.init_parallel(layout)
    rank0 = torch.distributed.get_rank() == 0
    tmp = Path(rt.broadcast_object(str(make_tmp_dir(out)) if rank0 else None))
    try:
        fill, stats = _fill_and_save(plan, layout, pipeline_layout, tmp, progress and rank0)
        metadata = _metadata(plan, layout, pipeline_layout, fill, rt.gather_objects(stats))
        if rank0:
            write_model_config(tmp, plan.hf_config, plan.model)
            write_json(tmp, IMPORT_METADATA_NAME, metadata)
            move_into_place(tmp, out, overwrite)
        torch.distributed.barrier()
    except BaseException:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportResult(out, metadata)


def _fill_and_save(
    plan: ImportPlan,
    layout: ParallelLayout,
    pipeline_layout: str | None,
    tmp: Path,
    progress: bool,
) -> tuple[FillReport, dict[str, Any]]:
    """This rank's part: build its stage, fill it from the HF shards, save it into ``tmp``."""
    from megatron.core import dist_checkpointing

    start = time.monotonic()
    model = rt.build_stage(plan.model, layout, DTYPES[plan.dtype], pipeline_layout)
    tensors = [t for t in model.state_dict().values() if torch.is_tensor(t)]
    bar = make_progress(sum(t.numel() * t.element_size() for t in tensors), "import", progress)
    sharding = StageSharding.from_parallel_state(plan.model.n_routed_experts)
    fill = fill_stage(model, plan.model, plan.checkpoint, sharding, bar)
    bar.close()
    filled_s = time.monotonic() - start
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
    del model, tensors
    torch.distributed.barrier()
    stats = {
        **rt.rank_coordinates(),
        "peak_rss_mib": rt.peak_rss_bytes() / 2**20,
        "tensors": fill.tensors,
        "bytes": fill.bytes,
        "fp8": fill.fp8_dequantized > 0,
        "fill_s": filled_s,
        "total_s": time.monotonic() - start,
    }
    return fill, stats


def pipeline_layout_for(
    cfg: ModelConfig, layout: ParallelLayout, requested: str | None = None
) -> str | None:
    """A share-group-respecting layout string (the trainer's resolver), or ``requested`` checked."""
    from indexcache_train.parallel import PipelineLayoutError
    from indexcache_train.parallel.pipeline_layout import resolve_pipeline_layout

    try:
        return resolve_pipeline_layout(cfg.schedule, layout.pp, layout=requested)
    except PipelineLayoutError as exc:
        raise ParallelLayoutError(
            f"pipeline layout: {exc}", fix="pass another --pipeline-layout"
        ) from exc


def _metadata(
    plan: ImportPlan,
    layout: ParallelLayout,
    pipeline_layout: str | None,
    fill: FillReport,
    ranks: list[dict[str, Any]],
) -> dict[str, Any]:
    """``import_metadata.json`` (collective: every rank must call it)."""
    import megatron.core

    read = set().union(*rt.gather_objects(sorted(fill.hf_tensors)))
    narrowed = sorted(set().union(*rt.gather_objects(fill.narrowed)))
    notes = list(plan.notes)
    if narrowed:
        notes.append(
            f"{len(narrowed)} HF tensor(s) stored wider than {plan.dtype} were cast (first: "
            f"{narrowed[0]}); import with --dtype float32 to keep them exact"
        )
    return {
        "format": FORMAT,
        "created_by": "python -m checkpoint_tools import",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "megatron_core": getattr(megatron.core, "__version__", "unknown"),
        "source": str(plan.checkpoint.path.resolve()),
        "model_type": plan.model.family,
        "schedule": plan.model.schedule.describe(),
        "dtype": plan.dtype,
        "layout": {
            "tensor_model_parallel_size": layout.tp,
            "pipeline_model_parallel_size": layout.pp,
            "expert_model_parallel_size": layout.ep,
            "expert_tensor_parallel_size": layout.etp,
            "world_size": len(ranks),
            "pipeline_model_parallel_layout": pipeline_layout,
        },
        "hf_tensors_read": len(read),
        "fp8_dequantized": any(r["fp8"] for r in ranks),
        "dropped_shared_layer_indexers": plan.dropped,
        "notes": notes,
        "ranks": ranks,
    }


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register this verb's flags."""
    parser.add_argument("--hf", required=True, type=Path, help="input HF checkpoint directory")
    parser.add_argument(
        "--out", required=True, type=Path, help="output Megatron checkpoint directory"
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size of the import")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel size (divides TP x DP)")
    parser.add_argument(
        "--pipeline-layout",
        help="Megatron pipeline_model_parallel_layout string (default: the trainer's share-group "
        "layout for --pp)",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--index-topk-freq", type=int, help="schedule: every N-th layer Full")
    which.add_argument("--pattern", help="schedule: F/S per layer (default: the config's schedule)")
    parser.add_argument(
        "--index-skip-topk-offset", type=int, help="offset (required with freq > 1)"
    )
    parser.add_argument(
        "--drop-shared-indexers",
        action="store_true",
        help="skip indexers the checkpoint holds on layers the schedule makes Shared",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="parameter dtype (default: config's)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Run the verb on every rank; rank 0 prints the summary."""
    rt.hide_gpus()
    request = None
    if args.index_topk_freq is not None or args.pattern is not None:
        request = ScheduleRequest(args.index_topk_freq, args.index_skip_topk_offset, args.pattern)
    elif args.index_skip_topk_offset is not None:
        raise ConfigScheduleMismatchError("--index-skip-topk-offset needs --index-topk-freq")
    check_output_dir(args.out, args.overwrite)  # before any work: refusing late wastes an hour
    plan = plan_import(
        HFCheckpoint(args.hf),
        request,
        drop_shared_indexers=args.drop_shared_indexers,
        dtype=args.dtype,
    )
    layout = ParallelLayout.for_import(args.tp, args.pp, args.ep)
    layout.check(launch_world_size(), plan.model)
    result = run_import(
        plan,
        args.out,
        layout,
        pipeline_layout=args.pipeline_layout,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(describe(result))
    return 0


def describe(result: ImportResult) -> str:
    """The summary ``import`` prints: schedule, layout and peak memory per rank."""
    md = result.metadata
    lay = md["layout"]
    lines = [
        f"wrote {result.out_dir} ({md['model_type']}, {md['dtype']}, {md['hf_tensors_read']} HF tensors)",
        f"schedule: {md['schedule']}",
        f"layout:   TP={lay['tensor_model_parallel_size']} PP={lay['pipeline_model_parallel_size']} "
        f"EP={lay['expert_model_parallel_size']} on {lay['world_size']} rank(s)",
        "rank  tp  pp  ep   tensors   GiB read   peak RSS MiB   fill s   total s",
    ]
    for r in md["ranks"]:
        lines.append(
            f"{r['rank']:4d} {r['tp']:3d} {r['pp']:3d} {r['ep']:3d} {r['tensors']:9d} "
            f"{r['bytes'] / 2**30:10.3f} {r['peak_rss_mib']:14.1f} {r['fill_s']:8.2f} {r['total_s']:9.2f}"
        )
    if md["dropped_shared_layer_indexers"]:
        lines.append(
            f"dropped {len(md['dropped_shared_layer_indexers'])} Shared-layer indexer tensor(s)"
        )
    lines += [f"note: {note}" for note in md["notes"]]
    return "\n".join(lines)
