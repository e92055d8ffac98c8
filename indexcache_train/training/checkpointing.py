"""Distributed checkpoints: save (atomic), auto-resume, retention, pretrained init.

Layout of a run's checkpoint directory::

    checkpoints/
      step_00000120/            one Megatron dist checkpoint (model chunks + optimizer)
        trainer_state.json      step, stage, consumed samples, why it was saved
        run_config.yaml         the resolved config this run trains with
        model_config.yaml       the model (HF config, schedule keys explicit): `checkpoint_tools
                                export --ckpt step_XXXXXXXX` reads it
      latest                    name of the newest complete checkpoint

Every rank writes its shards into ``step_X.tmp``; after a barrier rank 0 writes the metadata
files and renames the directory, so a crash never leaves a directory that looks complete. The
optimizer uses Megatron's ``dp_reshardable`` format (the default format was refused by
Megatron's own validator in 0.19.2; see docs/megatron-notes).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STEP_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass(frozen=True)
class TrainerState:
    step: int  # number of completed optimizer steps
    stage_index: int
    consumed_train_samples: int
    reason: str  # interval | stage_end | final | signal

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _sharded(chunks: list, optimizer: Any | None, is_loading: bool) -> dict[str, Any]:
    sd: dict[str, Any] = {}
    model_sd: dict[str, Any] = {}
    for i, c in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        sd[key] = c.sharded_state_dict()
        model_sd.update(sd[key])
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=OPTIM_METADATA
        )
    return sd


def step_dir(root: Path, step: int) -> Path:
    return root / f"{STEP_PREFIX}{step:08d}"


def save(
    root: Path, chunks: list, optimizer: Any, state: TrainerState, files: dict[str, str]
) -> Path:
    """Save model chunks (unwrapped modules) + optimizer; returns the final directory."""
    from megatron.core import dist_checkpointing

    final = step_dir(root, state.step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(_sharded(chunks, optimizer, is_loading=False), str(tmp))
    _barrier()
    if _rank() == 0:
        (tmp / STATE_FILE).write_text(state.to_json())
        for name, text in files.items():
            (tmp / name).write_text(text)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
    _barrier()
    return final


def latest(root: Path) -> Path | None:
    """Newest *complete* checkpoint (``latest`` pointer, else the highest step with a state file)."""
    pointer = root / "latest"
    if pointer.is_file():
        d = root / pointer.read_text().strip()
        if (d / STATE_FILE).is_file():
            return d
    candidates = sorted(
        p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file()
    )
    return candidates[-1] if candidates else None


def read_state(d: Path) -> TrainerState:
    return TrainerState(**json.loads((d / STATE_FILE).read_text()))


@torch.no_grad()
def load(d: Path, chunks: list, optimizer: Any | None) -> TrainerState:
    """Load model (and optimizer, if given) in place; returns the trainer state."""
    from megatron.core import dist_checkpointing

    from indexcache_train.training.model_setup import init_optimizer_state

    if optimizer is not None:
        init_optimizer_state(optimizer)  # a fresh optimizer has no state to load into yet
    loaded = dist_checkpointing.load(_sharded(chunks, optimizer, is_loading=True), str(d))
    for i, c in enumerate(chunks):
        c.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    return read_state(d)


def _restore_adam_steps(optimizer: Any) -> None:
    """Megatron 0.19.2 restores the common ``step`` into the param groups, but its
    ``dp_reshardable`` parameter-state load then copies the per-parameter ``step`` tensor of the
    freshly initialised state back over it (0), so Adam's bias correction would restart. Re-apply
    the checkpoint's step (exact resume depends on it)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        steps = {g["step"] for g in inner.param_groups if "step" in g}
        if len(steps) != 1:
            continue
        step = float(steps.pop())
        for st in inner.state.values():
            if "step" in st:
                st["step"] = torch.tensor(step, dtype=torch.float32)


@torch.no_grad()
def load_model_only(d: Path, chunks: list) -> None:
    """Initialise weights from a checkpoint (e.g. ``checkpoint_tools import`` output)."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(_sharded(chunks, None, is_loading=True), str(d))
    for i, c in enumerate(chunks):
        c.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])


def apply_retention(root: Path, keep_last: int, protected: set[str]) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (never ``protected`` or ``latest``)."""
    if _rank() != 0 or keep_last <= 0:
        return []
    done = sorted(
        p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file()
    )
    pointer = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    removed = []
    for p in done[:-keep_last]:
        if p.name in protected or p.name == pointer:
            continue
        shutil.rmtree(p)
        removed.append(p)
    return removed
