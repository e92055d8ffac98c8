"""Check an HF checkpoint's tensor set against its config and IndexCache schedule, headers only.

:func:`validate_hf_checkpoint` reads shard headers (never tensor data) and reports, with file,
tensor and fix for each: missing tensors, unexpected tensors (an indexer on a Shared layer is
"droppable" with ``drop_shared_indexers``), FP8 weights without a well-shaped scale, shapes that
disagree with the config, dtypes that disagree with the config's ``dtype`` (fp32 is always
accepted; ``e_score_correction_bias`` must be fp32; FP8 only on 2-D linear weights of a config
with ``quantization_config``), and schedule keys that contradict each other. Corrupt or truncated
shards fail already when the checkpoint is opened.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from checkpoint_tools import fp8
from checkpoint_tools.errors import (
    CheckpointIssue,
    ConfigScheduleMismatchError,
    DtypeMismatchError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
    raise_issues,
)
from checkpoint_tools.hf_io import CONFIG_NAME, HFCheckpoint
from checkpoint_tools.layout import (
    ExpectedTensor,
    config_dtype,
    detect_expert_formats,
    expected_tensors,
    family_of,
    is_indexer_tensor,
    layer_of,
)
from checkpoint_tools.safetensors_format import FLOAT_DTYPES, TensorInfo
from indexcache_train.model.families import ModelFamily
from indexcache_train.schedule import IndexCacheSchedule, ScheduleError


@dataclass
class ValidationReport:
    """What :func:`validate_hf_checkpoint` found; ``issues`` are errors, ``notes`` are not."""

    path: Path
    family: ModelFamily
    schedule: IndexCacheSchedule | None
    num_tensors: int
    total_bytes: int
    num_shards: int
    expert_formats: dict[int, str]
    dtype_counts: dict[str, int]
    issues: list[CheckpointIssue] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Indexer tensors found on Shared layers (dropped by a conversion when allowed).
    shared_layer_indexers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues

    def raise_if_errors(self) -> None:
        """Raise the first issue's error class, listing every issue."""
        raise_issues(self.issues, f"checkpoint {self.path} failed validation")

    def summary(self) -> str:
        """A few human-readable lines (the ``inspect`` verb prints them)."""
        forms = sorted(set(self.expert_formats.values())) or ["none"]
        lines = [
            f"{self.path}: {self.family.model_type} ({self.family.architecture}), "
            f"{self.num_tensors} tensors, {self.num_shards} shard(s), {self.total_bytes / 1e9:.3f} GB",
            "schedule: "
            + (self.schedule.describe() if self.schedule else "dense MLA, no indexers"),
            f"routed experts stored: {', '.join(forms)}",
            "dtypes: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.dtype_counts.items())),
        ]
        lines += [f"note: {note}" for note in self.notes]
        lines.append("status: OK" if self.ok else f"status: {len(self.issues)} problem(s)")
        lines += [f"  - {issue}" for issue in self.issues]
        return "\n".join(lines)


def schedule_from_config(
    config: Mapping[str, Any], family: ModelFamily, file: str = CONFIG_NAME
) -> IndexCacheSchedule | None:
    """The config's schedule (HF precedence and defaults); None for a dense family."""
    if not family.has_indexers:
        return None
    try:
        return IndexCacheSchedule.from_hf_config(config)
    except ScheduleError as exc:
        raise ConfigScheduleMismatchError(
            f"schedule keys are inconsistent: {exc}",
            file=file,
            fix="make index_topk_freq / index_skip_topk_offset / index_topk_pattern / "
            "indexer_types agree (or keep only indexer_types)",
        ) from exc


def validate_hf_checkpoint(
    checkpoint: str | os.PathLike[str] | HFCheckpoint,
    *,
    schedule: IndexCacheSchedule | None = None,
    drop_shared_indexers: bool = False,
) -> ValidationReport:
    """Check the tensor set of an HF checkpoint against its config and schedule.

    Args:
        checkpoint: a directory or an opened :class:`HFCheckpoint`.
        schedule: check against this schedule instead of the config's.
        drop_shared_indexers: report indexers on Shared layers as droppable, not as errors.

    Returns:
        The report; call :meth:`ValidationReport.raise_if_errors` to turn issues into an error.

    Raises:
        CorruptShardError, ConfigError, ConfigScheduleMismatchError: problems that stop the
            check itself (unreadable shards, unsupported model_type, contradictory schedule keys).
    """
    ckpt = checkpoint if isinstance(checkpoint, HFCheckpoint) else HFCheckpoint(checkpoint)
    config, cfg_file = ckpt.config, str(ckpt.path / CONFIG_NAME)
    family = family_of(config, cfg_file)
    n = int(config["num_hidden_layers"])
    num_mtp = int(config.get("num_nextn_predict_layers") or 0)
    if schedule is None:
        schedule = schedule_from_config(config, family, cfg_file)
    elif (schedule.num_layers, schedule.num_mtp_layers) != (n, num_mtp):
        raise ConfigScheduleMismatchError(
            f"schedule covers {schedule.num_layers} + {schedule.num_mtp_layers} MTP layers, the "
            f"config {n} + {num_mtp}",
            file=cfg_file,
            fix="give one role per layer of this model",
        )
    infos = {info.name: info for info in ckpt.infos()}
    formats = detect_expert_formats(list(infos))
    report = ValidationReport(
        path=ckpt.path,
        family=family,
        schedule=schedule,
        num_tensors=len(infos),
        total_bytes=ckpt.total_size,
        num_shards=len(ckpt.shard_files),
        expert_formats=formats,
        dtype_counts=dict(Counter(info.dtype for info in infos.values())),
    )
    expected = expected_tensors(config, schedule, formats, file=cfg_file)
    policy = _DtypePolicy.from_config(config)
    _check_present(report, infos, expected, policy, n + num_mtp, drop_shared_indexers)
    _check_absent(report, infos, expected)
    report.issues += fp8.fp8_issues(infos, fp8.block_size_from_config(config))
    for layer, form in sorted(formats.items()):
        if form == "mixed":
            report.issues.append(
                CheckpointIssue(
                    UnexpectedTensorError,
                    f"layer {layer} stores routed experts both fused and per expert",
                    cfg_file,
                    f"model.layers.{layer}.mlp.experts.*",
                    "keep one form per layer (per-expert is what releases use)",
                )
            )
    return report


@dataclass(frozen=True)
class _DtypePolicy:
    config_dtype: str | None
    quantized: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> _DtypePolicy:
        quant = config.get("quantization_config") or {}
        return cls(config_dtype(config), quant.get("quant_method") == "fp8")

    def problem(self, exp: ExpectedTensor, info: TensorInfo) -> tuple[str, str] | None:
        """``(message, fix)`` when the stored dtype is not acceptable, else None."""
        if exp.fp32_only:
            if info.dtype != "F32":
                return f"stored as {info.dtype}; it must be F32", "re-export it in fp32"
            return None
        if fp8.is_fp8(info.dtype):
            if not exp.quantizable:
                return f"stored as {info.dtype}, but only 2-D linear weights may be FP8", (
                    "store it in the config dtype"
                )
            if not self.quantized:
                return f"stored as {info.dtype} but config.json has no FP8 quantization_config", (
                    "add the release's quantization_config (quant_method fp8, weight_block_size "
                    "[128, 128]), or dequantise the checkpoint"
                )
            return None
        if info.dtype not in FLOAT_DTYPES:
            return f"stored as {info.dtype}, not a floating-point dtype", "re-export the tensor"
        if self.config_dtype and info.dtype not in (self.config_dtype, "F32"):
            return f"stored as {info.dtype} but config.json says {self.config_dtype}", (
                "re-save in the config dtype (fp32 is always accepted) or correct config.json"
            )
        return None


def _check_present(
    report: ValidationReport,
    infos: Mapping[str, TensorInfo],
    expected: Mapping[str, ExpectedTensor],
    policy: _DtypePolicy,
    num_layers_total: int,
    drop_shared_indexers: bool,
) -> None:
    schedule = report.schedule
    for name, info in infos.items():
        exp = expected.get(name)
        if exp is not None:
            if info.shape != exp.shape:
                report.issues.append(
                    CheckpointIssue(
                        ShapeMismatchError,
                        f"shape {list(info.shape)}, the config implies {list(exp.shape)}",
                        info.file,
                        name,
                        "check config.json sizes against the checkpoint (wrong config copied?)",
                    )
                )
            if problem := policy.problem(exp, info):
                report.issues.append(
                    CheckpointIssue(DtypeMismatchError, problem[0], info.file, name, problem[1])
                )
            continue
        if fp8.is_scale_name(name) and fp8.weight_name_of_scale(name) in infos:
            continue  # pairing and shape are fp8.fp8_issues' job
        layer = layer_of(name)
        if (
            is_indexer_tensor(name)
            and schedule is not None
            and layer is not None
            and layer < num_layers_total
            and not schedule.is_full(layer)
        ):
            report.shared_layer_indexers.append(name)
            if drop_shared_indexers:
                continue
            message = f"indexer tensor on layer {layer}, which the schedule makes Shared"
            fix = (
                "pass --drop-shared-indexers to drop Shared-layer indexers, or make the layer "
                "Full in config.json"
            )
        elif is_indexer_tensor(name) and schedule is None:
            message = f"indexer tensor in a {report.family.model_type} (dense MLA) checkpoint"
            fix = f"set model_type to {report.family.dsa_model_type} and add the DSA config keys"
        elif layer is not None and layer >= num_layers_total:
            message = (
                f"layer {layer} is beyond num_hidden_layers + num_nextn_predict_layers "
                f"({num_layers_total})"
            )
            fix = "set num_nextn_predict_layers to the number of MTP layers stored"
        else:
            message = "not part of the layout the config implies"
            fix = "remove it, or correct config.json"
        report.issues.append(CheckpointIssue(UnexpectedTensorError, message, info.file, name, fix))
    if drop_shared_indexers and report.shared_layer_indexers:
        report.notes.append(
            f"{len(report.shared_layer_indexers)} indexer tensor(s) on Shared layers will be dropped"
        )


def _check_absent(
    report: ValidationReport,
    infos: Mapping[str, TensorInfo],
    expected: Mapping[str, ExpectedTensor],
) -> None:
    for name, exp in expected.items():
        if exp.optional or name in infos:
            continue
        if is_indexer_tensor(name):
            fix = (
                "the config makes this layer Full but it has no indexer: correct the schedule keys, "
                "or run convert-schedule from a checkpoint that has it"
            )
        else:
            fix = "the checkpoint is incomplete or belongs to another config; re-download or re-export"
        report.issues.append(
            CheckpointIssue(
                MissingTensorError, "required tensor is missing", str(report.path), name, fix
            )
        )
