"""Resume or start: the checkpoint to continue from, and a config that changes the run refused.

A rerun of a run directory continues its newest complete checkpoint. The config it is rerun
with is compared with the one that checkpoint was trained with (its ``run_config.yaml``): a
change that alters the run's meaning (model, schedule, recipe, optimizer, batch, data, seed)
is refused before anything is built, listing each change, unless
``checkpoint.allow_config_change=true``; the run directory's ``run_config.yaml`` is written by
the fresh start only and never overwritten (an allowed change is recorded next to it).
Everything decided here reads files only, identically on every rank.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from indexcache_train.config.compose import to_yaml
from indexcache_train.config.schema import TrainConfig
from indexcache_train.training import checkpoint_files
from indexcache_train.training.checkpoint_files import RUN_CONFIG_FILE as RUN_CONFIG
from indexcache_train.training.checkpointing import (
    CheckpointError,
    TrainerState,
    check_resumable,
    latest,
    read_state,
)

__all__ = ["RESUME_SAFE", "ResumeError", "ResumePoint", "config_changes", "find_resume_point"]

log = logging.getLogger("indexcache_train")

#: Keys (or sections) a resume may change: they do not change what the run trains.
RESUME_SAFE: dict[str, str] = {
    "logging": "where and how often metrics go",
    "checkpoint": "when and where checkpoints are written",
    "run.dry_run": "not a training run",
    "run.world_size": "only read by the dry run",
    "run.name": "locates the run directory",
    "run.root": "locates the run directory",
    "run.deterministic": "the same math with fixed kernel choices",
    "parallel": "the same model laid out differently (checkpointing.check_resumable refuses a "
    "layout the checkpoint's optimizer format cannot reshard to)",
    "optim.micro_batch_size": "the same global batch; per-token loss gives the same update",
    "optim.on_nonfinite": "the guard's policy (its own advice is to resume with skip)",
    "optim.max_consecutive_skips": "the guard's policy",
    "data.num_workers": "loading speed only",
    "data.cache_dir": "where the sample index is cached",
    "model.kernel_backend": "the same operators computed by other kernels",
    "model.lm_loss_chunk": "the same loss computed in chunks",
    "distill.chunk": "the same loss computed in chunks",
}


class ResumeError(RuntimeError):
    """The run directory cannot be continued as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ResumePoint:
    """Where training continues: a checkpoint (and its state), or a fresh start."""

    directory: Path | None
    state: TrainerState | None

    @property
    def step(self) -> int:
        return self.state.step if self.state else 0

    @property
    def consumed_samples(self) -> int:
        return self.state.consumed_train_samples if self.state else 0


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        items = ((str(i), x) for i, x in enumerate(node))  # recipe stages: compare per field
    else:
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _safe(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") for s in RESUME_SAFE)


def config_changes(saved_yaml: str, cfg: TrainConfig) -> list[str]:
    """``key: old -> new`` for every meaning-changing key that differs from ``saved_yaml``.

    Keys only one side has (a schema that grew or shrank between versions) are not compared.
    """
    old = _flatten(OmegaConf.to_container(OmegaConf.create(saved_yaml)))
    new = _flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))
    return [
        f"{key}: {old[key]!r} -> {new[key]!r}"
        for key in sorted(old.keys() & new.keys())
        if old[key] != new[key] and not _safe(key)
    ]


def find_resume_point(cfg: TrainConfig, ckpt_root: Path) -> ResumePoint:
    """The checkpoint to continue from (checked against ``cfg``), or a fresh start.

    Raises:
        ResumeError: ``auto_resume=false`` over existing checkpoints, or a config change that
            alters the run without ``checkpoint.allow_config_change=true``.
        CheckpointError: A ``dp_reshardable`` optimizer state under another model-parallel
            layout (:func:`~indexcache_train.training.checkpointing.check_resumable`).
    """
    found, skipped = latest(ckpt_root)
    for warning in skipped:
        log.warning(warning)
    if found is None or not cfg.checkpoint.auto_resume:
        _check_pretrained(cfg)
    if not cfg.checkpoint.auto_resume:
        if found is not None:
            raise ResumeError(
                f"checkpoint.auto_resume=false, but {ckpt_root} holds checkpoints (newest "
                f"{found.name}); starting over there would mix two runs in one directory. Use "
                "another run.name, run.root or checkpoint.dir, or remove the old checkpoints"
            )
        return ResumePoint(None, None)
    if found is None:
        return ResumePoint(None, None)
    point = ResumePoint(found, read_state(found))
    check_resumable(found, asdict(cfg.parallel))
    saved = found / RUN_CONFIG
    if not saved.is_file():
        log.warning("%s has no %s: the config cannot be compared with it", found, RUN_CONFIG)
        return point
    changes = config_changes(saved.read_text(), cfg)
    if changes and not cfg.checkpoint.allow_config_change:
        listing = "\n  ".join(changes)
        raise ResumeError(
            f"{found} (step {point.step}) was trained with another config; resuming would "
            f"change what the run trains:\n  {listing}\nRerun with the overrides of {saved}, "
            "start a new run (another run.name or checkpoint.dir), or pass "
            "checkpoint.allow_config_change=true to continue with the new values on purpose"
        )
    for change in changes:
        log.warning("config change on resume (allowed): %s", change)
    return point


def _check_pretrained(cfg: TrainConfig) -> None:
    """A fresh start from ``checkpoint.load_pretrained`` needs a Megatron checkpoint there (found
    now, not after the model is built)."""
    path = cfg.checkpoint.load_pretrained
    if path and not (Path(path) / "metadata.json").is_file():
        raise CheckpointError(
            f"checkpoint.load_pretrained={path}: no Megatron checkpoint there (no "
            "metadata.json); create one with `python -m checkpoint_tools import --hf HF_DIR "
            f"--out {path}` or point at a trainer checkpoint's step_XXXXXXXX directory"
        )


def prepare_run_dir(cfg: TrainConfig, out_dir: Path, ckpt_root: Path, point: ResumePoint) -> None:
    """Rank 0, before training: remove a crashed save's temporaries and record the config.

    ``run_config.yaml`` is the config of the fresh start; a resume with an allowed change
    writes ``run_config.step<N>.yaml`` next to it; a plain resume writes nothing.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for stale in checkpoint_files.remove_stale_temporaries(ckpt_root):
        log.warning("removed %s, left by a save that did not finish", stale)
    text = to_yaml(cfg)
    if point.directory is None:
        checkpoint_files.write_durable(out_dir / RUN_CONFIG, text)
    elif (point.directory / RUN_CONFIG).is_file() and config_changes(
        (point.directory / RUN_CONFIG).read_text(), cfg
    ):
        checkpoint_files.write_durable(out_dir / f"run_config.step{point.step:08d}.yaml", text)
