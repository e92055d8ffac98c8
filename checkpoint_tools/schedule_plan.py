"""Planning and executing a schedule conversion (the engine behind ``convert-schedule``).

:func:`plan_conversion` decides every output tensor (copy, copy-renamed from a source layer, or
fresh) and the output config from shard headers alone, and checks the plan against the layout
the new config implies; :func:`execute_plan` streams it into a :class:`ShardedCheckpointWriter`.
The rules are in :mod:`checkpoint_tools.convert_schedule`'s docstring.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from checkpoint_tools import fp8
from checkpoint_tools.errors import (
    ConfigScheduleMismatchError,
    MissingTensorError,
    UnexpectedTensorError,
    UnsupportedConversionError,
)
from checkpoint_tools.hf_io import (
    CONFIG_NAME,
    HFCheckpoint,
    ShardedCheckpointWriter,
    copy_side_files,
)
from checkpoint_tools.indexer_init import FreshTensor, fresh_indexer, materialise
from checkpoint_tools.layout import (
    config_dtype,
    detect_expert_formats,
    dims_of,
    expected_tensors,
    indexer_prefix,
    is_indexer_tensor,
    layer_of,
    mlp_layer_types,
)
from checkpoint_tools.safetensors_format import TensorSpec
from checkpoint_tools.validation import schedule_from_config, validate_hf_checkpoint
from indexcache_train.model.families import FAMILIES, ModelFamily
from indexcache_train.schedule import IndexCacheSchedule, ScheduleError
from indexcache_train.schedule.hf_keys import SCHEDULE_KEYS

FROM_SOURCE, RANDOM = "from-source", "random"


@dataclass(frozen=True)
class ScheduleRequest:
    """The schedule asked for on the command line: freq/offset or an F/S pattern."""

    index_topk_freq: int | None = None
    index_skip_topk_offset: int | None = None
    pattern: str | None = None

    def build(self, num_layers: int, num_mtp: int, share_mtp: bool) -> IndexCacheSchedule:
        """Resolve against the model (raises ScheduleError on a bad request)."""
        if (self.pattern is None) == (self.index_topk_freq is None):
            raise ScheduleError("give exactly one of --index-topk-freq and --pattern")
        if self.pattern is not None:
            if self.index_skip_topk_offset is not None:
                raise ScheduleError(
                    "--index-skip-topk-offset goes with --index-topk-freq, not --pattern"
                )
            return IndexCacheSchedule.from_pattern(
                self.pattern, num_layers, num_mtp, index_share_for_mtp_iteration=share_mtp
            )
        freq, offset = self.index_topk_freq, self.index_skip_topk_offset
        if offset is None:
            if freq != 1:
                # Engines disagree on the default (HF/vLLM/SGLang 2, Megatron 1): never guess.
                raise ScheduleError(
                    f"--index-topk-freq {freq} needs an explicit --index-skip-topk-offset"
                )
            offset = 1
        return IndexCacheSchedule.from_freq_offset(
            num_layers, freq, offset, num_mtp, index_share_for_mtp_iteration=share_mtp
        )


@dataclass(frozen=True)
class IndexerDims:
    """Sizes of fresh indexers for a dense-MLA input."""

    index_topk: int
    index_head_dim: int
    index_n_heads: int


@dataclass(frozen=True)
class PlanEntry:
    """One output tensor: copied from ``source`` (possibly renamed) or created by ``fresh``."""

    spec: TensorSpec
    source: str | None = None
    fresh: FreshTensor | None = None


@dataclass
class ConversionPlan:
    """Everything decided before writing; :func:`execute_plan` only carries it out."""

    checkpoint: HFCheckpoint
    family_in: ModelFamily
    family_out: ModelFamily
    schedule_in: IndexCacheSchedule | None
    schedule_out: IndexCacheSchedule
    config_out: dict[str, Any]
    entries: list[PlanEntry]
    dropped: list[str] = field(default_factory=list)
    #: Output layer -> input layer whose indexer it received (itself when kept).
    indexer_from: dict[int, int] = field(default_factory=dict)
    initialised: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """Human-readable summary (printed by the CLI)."""
        before = self.schedule_in.describe() if self.schedule_in else "dense MLA (no indexers)"
        copied = {dst: src for dst, src in self.indexer_from.items() if dst != src}
        lines = [
            f"model_type: {self.family_in.model_type} -> {self.family_out.model_type}",
            f"schedule:   {before}",
            f"        ->  {self.schedule_out.describe()}",
            f"tensors:    {len(self.entries)} written, {len(self.dropped)} dropped",
        ]
        if copied:
            lines.append(
                "indexers copied from source: "
                + ", ".join(f"{d}<-{s}" for d, s in sorted(copied.items()))
            )
        if self.initialised:
            lines.append(f"indexers initialised fresh: layers {self.initialised}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def plan_conversion(
    ckpt: HFCheckpoint,
    request: ScheduleRequest,
    *,
    init_missing_indexers: str | None = None,
    drop_shared_indexers: bool = False,
    index_dims: IndexerDims | None = None,
    allow_transformers_incompatible: bool = False,
) -> ConversionPlan:
    """Decide every output tensor and the output config; reads headers only."""
    cfg_file = str(ckpt.path / CONFIG_NAME)
    report = validate_hf_checkpoint(ckpt, drop_shared_indexers=drop_shared_indexers)
    report.raise_if_errors()
    family_in = report.family
    family_out = FAMILIES[family_in.dsa_model_type]
    config = ckpt.config
    n, num_mtp = int(config["num_hidden_layers"]), int(config.get("num_nextn_predict_layers") or 0)
    try:
        schedule_out = request.build(
            n, num_mtp, bool(config.get("index_share_for_mtp_iteration", False))
        )
    except ScheduleError as exc:
        raise ConfigScheduleMismatchError(
            f"requested schedule does not fit this model ({n} layers + {num_mtp} MTP): {exc}",
            file=cfg_file,
        ) from exc
    init = _resolve_init(family_in, init_missing_indexers, cfg_file)
    config_out = _output_config(config, family_in, family_out, schedule_out, index_dims, cfg_file)
    schedule_out, notes = _read_back(schedule_out, config_out, family_out)
    notes += check_family_support(
        family_out, schedule_out, allow_transformers_incompatible, cfg_file
    )
    plan = ConversionPlan(
        ckpt,
        family_in,
        family_out,
        report.schedule,
        schedule_out,
        config_out,
        [],
        notes=notes + report.notes,
    )
    _plan_tensors(plan, init)
    _check_plan_against_layout(plan)
    return plan


def execute_plan(
    plan: ConversionPlan,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    shard_size: int | str = "5GB",
    seed: int = 0,
    progress: bool = False,
    before_commit: Callable[[Path], None] | None = None,
) -> None:
    """Write the planned checkpoint; validated in its temporary directory before the rename."""

    def validate_output(tmp: Path) -> None:
        validate_hf_checkpoint(tmp).raise_if_errors()
        if before_commit is not None:
            before_commit(tmp)

    ckpt = plan.checkpoint
    specs = [entry.spec for entry in plan.entries]
    with ShardedCheckpointWriter(
        out_dir,
        specs,
        max_shard_size=shard_size,
        overwrite=overwrite,
        progress=progress,
        before_commit=validate_output,
    ) as writer:
        writer.write_json(CONFIG_NAME, plan.config_out)
        copy_side_files(ckpt.path, writer, skip=(CONFIG_NAME,))
        for entry in plan.entries:
            if entry.fresh is not None:
                writer.write_tensor(entry.spec.name, materialise(entry.fresh, seed))
            else:
                writer.copy_tensor(entry.spec.name, ckpt.info(entry.source or entry.spec.name))


# ---------------------------------------------------------------------- planning steps
def check_family_support(
    family: ModelFamily, schedule: IndexCacheSchedule, allow: bool, cfg_file: str
) -> list[str]:
    """Refuse Shared layers for a family transformers 5.17 cannot hold them in (unless
    ``allow``); returns the note to print when allowed."""
    if family.supports_shared_layers or all(t == "full" for t in schedule.all_types):
        return []
    if not allow:
        raise UnsupportedConversionError(
            f"{family.model_type} cannot hold Shared layers in transformers 5.17 (it builds an "
            "indexer on every layer); relabelling it glm_moe_dsa would switch the indexer RoPE from "
            "half-split to interleaved",
            file=cfg_file,
            fix="keep this model all-Full, or pass --allow-transformers-incompatible to write the "
            "schedule for engines/trainers that honour it (transformers cannot load the result)",
        )
    return [
        f"{family.model_type} with Shared layers: transformers 5.17 cannot load this checkpoint "
        "correctly (it would initialise indexers on Shared layers at random)"
    ]


def _read_back(
    requested: IndexCacheSchedule, config_out: dict[str, Any], family: ModelFamily
) -> tuple[IndexCacheSchedule, list[str]]:
    """The schedule every reader will see in the written config; the tensors must follow it.

    config.json has no key for MTP roles: ``indexer_types`` / ``index_topk_pattern`` cover the
    trunk, and ``from_hf_config`` gives MTP layers the freq/offset rule when the schedule is
    periodic and Full otherwise. An MTP role a non-periodic pattern sets explicitly (a pattern
    of ``N + k`` characters) therefore does not survive; we follow the read-back and say so.
    """
    effective = schedule_from_config(config_out, family)
    assert effective is not None  # output families always have indexers
    if effective.indexer_types != requested.indexer_types:
        raise AssertionError(
            f"trunk schedule does not survive config.json: wrote {requested.pattern}, "
            f"read back {effective.pattern}"
        )
    if effective.mtp_indexer_types == requested.mtp_indexer_types:
        return effective, []
    return effective, [
        f"MTP roles {list(requested.mtp_indexer_types)} were requested but config.json can only "
        f"express {list(effective.mtp_indexer_types)} (indexer_types covers the trunk); MTP "
        "layers follow the latter"
    ]


def _resolve_init(family_in: ModelFamily, requested: str | None, cfg_file: str) -> str:
    if requested not in (None, FROM_SOURCE, RANDOM):
        raise ValueError(f"init_missing_indexers must be {FROM_SOURCE!r} or {RANDOM!r}")
    if family_in.has_indexers:
        return requested or FROM_SOURCE
    if requested == FROM_SOURCE:
        raise UnsupportedConversionError(
            f"{family_in.model_type} has no indexers to copy from",
            file=cfg_file,
            fix="use --init-missing-indexers random (the default for dense-MLA inputs)",
        )
    return RANDOM


def _output_config(
    config: dict[str, Any],
    family_in: ModelFamily,
    family_out: ModelFamily,
    schedule: IndexCacheSchedule,
    index_dims: IndexerDims | None,
    cfg_file: str,
) -> dict[str, Any]:
    out = {k: v for k, v in config.items() if k not in SCHEDULE_KEYS}
    if family_in is family_out:
        if index_dims is not None and (
            index_dims.index_topk,
            index_dims.index_head_dim,
            index_dims.index_n_heads,
        ) != (config.get("index_topk"), config.get("index_head_dim"), config.get("index_n_heads")):
            raise UnsupportedConversionError(
                "indexer sizes come from the input config for a model that has indexers",
                file=cfg_file,
                fix="drop --index-topk / --index-head-dim / --index-n-heads",
            )
    else:
        if config.get("rope_interleave", True) is not True:
            raise UnsupportedConversionError(
                f"rope_interleave is false, but {family_out.model_type} in transformers 5.17 "
                "always interleaves the MLA RoPE",
                file=cfg_file,
            )
        topk, head_dim, n_heads = (
            (index_dims.index_topk, index_dims.index_head_dim, index_dims.index_n_heads)
            if index_dims is not None
            else family_out.index_defaults or (2048, 128, 32)
        )
        mlp_types = mlp_layer_types(config, family_in, cfg_file)
        out.pop("auto_map", None)  # points at the old family's remote code
        out.update(
            model_type=family_out.model_type,
            architectures=[family_out.architecture],
            # Explicit: the new family derives dense layers differently when the key is absent.
            mlp_layer_types=mlp_types,
            index_topk=topk,
            index_head_dim=head_dim,
            index_n_heads=n_heads,
        )
        n_dense = mlp_types.count("dense")
        if mlp_types[:n_dense] == ["dense"] * n_dense:  # dense layers form a prefix
            out["first_k_dense_replace"] = n_dense
    out.update(schedule.to_hf_config())
    out.setdefault("rope_interleave", True)
    if out.get("indexer_rope_interleave") is None:
        out["indexer_rope_interleave"] = family_out.indexer_rope_interleave
    return out


def _plan_tensors(plan: ConversionPlan, init: str) -> None:
    ckpt, schedule_in, schedule_out = plan.checkpoint, plan.schedule_in, plan.schedule_out
    by_layer: dict[int, list[str]] = {}
    for name in ckpt.names:
        layer = layer_of(name)
        if layer is not None and is_indexer_tensor(name):
            by_layer.setdefault(layer, []).append(name)
        else:
            plan.entries.append(PlanEntry(_spec(ckpt, name)))
    dims = dims_of(plan.config_out, plan.family_out)
    template = _template_dtypes(ckpt, by_layer, schedule_in)
    default_dtype = config_dtype(plan.config_out) or "BF16"
    std = float(plan.config_out.get("initializer_range", 0.02))
    for layer in schedule_out.full_layers:
        if schedule_in is not None and schedule_in.is_full(layer):
            source = layer
        elif schedule_in is not None and init == FROM_SOURCE:
            source = schedule_in.source(layer)
        else:
            for fresh in fresh_indexer(
                dims,
                plan.family_out,
                layer,
                std=std,
                default_dtype=default_dtype,
                template_dtypes=template,
            ):
                plan.entries.append(PlanEntry(fresh.spec, fresh=fresh))
            plan.initialised.append(layer)
            continue
        plan.indexer_from[layer] = source
        src_prefix, dst_prefix = indexer_prefix(source), indexer_prefix(layer)
        for name in by_layer.get(source, []):
            dst = dst_prefix + name[len(src_prefix) :]
            plan.entries.append(PlanEntry(_spec(ckpt, name, dst), source=name))
    used = {e.source for e in plan.entries if e.source}
    plan.dropped = [name for names in by_layer.values() for name in names if name not in used]
    order = _layout_order(plan)
    plan.entries.sort(key=lambda e: order(e.spec.name))


def _template_dtypes(
    ckpt: HFCheckpoint, by_layer: dict[int, list[str]], schedule_in: IndexCacheSchedule | None
) -> dict[str, str]:
    """Dtypes of the first Full input layer's indexer, by tensor suffix (for fresh indexers)."""
    if schedule_in is None:
        return {}
    first = schedule_in.full_layers[0]
    prefix = indexer_prefix(first)
    return {name[len(prefix) :]: ckpt.info(name).dtype for name in by_layer.get(first, [])}


def _layout_order(plan: ConversionPlan) -> Callable[[str], tuple[int, float]]:
    """Sort key: position in the output layout; a scale sits right after its weight."""
    positions = {name: i for i, name in enumerate(_expected_out(plan))}

    def key(name: str) -> tuple[int, float]:
        if name in positions:
            return (0, positions[name])
        if fp8.is_scale_name(name) and fp8.weight_name_of_scale(name) in positions:
            return (0, positions[fp8.weight_name_of_scale(name)] + 0.5)
        return (1, 0.0)  # optional or unknown; _check_plan_against_layout rejects the unknown

    return key


def _expected_out(plan: ConversionPlan) -> dict[str, Any]:
    names = [e.spec.name for e in plan.entries]
    return expected_tensors(plan.config_out, plan.schedule_out, detect_expert_formats(names))


def _check_plan_against_layout(plan: ConversionPlan) -> None:
    """Bug guard: the plan must be exactly what the new config implies, before writing."""
    expected = _expected_out(plan)
    planned = {e.spec.name for e in plan.entries}
    for name in planned:
        if name not in expected and not (
            fp8.is_scale_name(name) and fp8.weight_name_of_scale(name) in planned
        ):
            raise UnexpectedTensorError(
                "planned output tensor is not in the target layout", tensor=name
            )
    for name, exp in expected.items():
        if not exp.optional and name not in planned:
            raise MissingTensorError(
                "target layout needs a tensor the plan does not produce", tensor=name
            )


def _spec(ckpt: HFCheckpoint, name: str, dst: str | None = None) -> TensorSpec:
    info = ckpt.info(name)
    return TensorSpec(dst or name, info.dtype, info.shape)
