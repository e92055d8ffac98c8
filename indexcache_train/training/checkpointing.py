"""Distributed checkpoints: save (atomic), auto-resume, retention, pretrained init.

Layout of a run's checkpoint directory::

    checkpoints/
      step_00000120/            one Megatron dist checkpoint (model chunks + optimizer)
        trainer_state.json      step, stage, consumed samples, why it was saved
        run_config.yaml         the resolved config this run trains with
        model_config.yaml       the model (HF config, schedule keys explicit): `checkpoint_tools
                                export --ckpt step_XXXXXXXX` reads it
        manifest.json           the size of every file (completeness check on resume)
      latest                    name of the newest complete checkpoint

Every rank writes its shards into ``step_X.tmp``; once all ranks agree the shards are written,
rank 0 seals the directory (:mod:`.checkpoint_files`: fsync, manifest, rename), so a crash never
leaves a directory that looks complete, and a failed save (a full disk) removes its temporary
and says so.

Model weights reshard to any layout. The distributed optimizer's state is written in one of two
Megatron formats (``checkpoint.optimizer_format``; the one used is kept in trainer_state.json):
``dp_reshardable`` (each rank writes its own shard, no communication; resumable at another DP
size only) or ``fully_reshardable`` (each model-parallel shard's state is all-gathered over DP
and written per parameter; resumable under any TP / PP / EP / CP / DP). Megatron's default
format was refused by its own validator in 0.19.2 (docs/megatron-notes).
"""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from indexcache_train.config.validate import OPTIMIZER_FORMATS
from indexcache_train.training import checkpoint_files as files_on_disk
from indexcache_train.training.checkpoint_files import (
    LATEST,
    RUN_CONFIG_FILE,
    STATE_FILE,
    TMP_SUFFIX,
)

STEP_PREFIX = "step_"
#: The parallel settings a ``dp_reshardable`` optimizer state is tied to (it reshards over DP).
MODEL_PARALLEL_KEYS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "context_parallel_size",
    "expert_model_parallel_size",
    "pipeline_layout",
)


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message names the directory and the fix."""


@dataclass(frozen=True)
class TrainerState:
    step: int  # number of completed optimizer steps
    stage_index: int
    consumed_train_samples: int
    reason: str  # interval | stage_end | final | signal
    #: How the optimizer state was written (checkpoints that predate the field: dp_reshardable).
    optimizer_format: str = "dp_reshardable"

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _sharded(
    chunks: list,
    optimizer: Any | None,
    is_loading: bool,
    optimizer_format: str = OPTIMIZER_FORMATS[0],
) -> dict[str, Any]:
    sd: dict[str, Any] = {}
    model_sd: dict[str, Any] = {}
    for i, c in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        sd[key] = c.sharded_state_dict()
        model_sd.update(sd[key])
    if optimizer is not None:
        metadata: dict[str, Any] = {"distrib_optim_sharding_type": optimizer_format}
        if optimizer_format == "fully_reshardable":
            # Keys by parameter name only: the same whether this layout chains one optimizer
            # or two (EP > 1 gives experts their own), so EP=1 <-> EP>1 reshards too.
            metadata["chained_optim_avoid_prefix"] = True
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=metadata
        )
    return sd


def step_dir(root: Path, step: int) -> Path:
    return root / f"{STEP_PREFIX}{step:08d}"


def save(
    root: Path, chunks: list, optimizer: Any, state: TrainerState, files: dict[str, str]
) -> Path:
    """Save model chunks (unwrapped modules) + optimizer; returns the final directory.

    Raises:
        CheckpointError: On any rank's failure (a full disk included), after the partial
            ``step_X.tmp`` is removed; the previous checkpoint is untouched.
    """
    from megatron.core import dist_checkpointing

    from indexcache_train.training.model_setup import ensure_optimizer_state

    final = step_dir(root, state.step)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    # A stage whose every update was skipped has no Adam state yet, and Megatron's
    # DistributedOptimizer.state_dict asserts on that; a fresh (zero) state is what the first
    # update would create.
    ensure_optimizer_state(optimizer)
    error: BaseException | None = None
    try:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        fmt = state.optimizer_format
        sharded = _sharded(chunks, optimizer, is_loading=False, optimizer_format=fmt)
        dist_checkpointing.save(sharded, str(tmp))
    except Exception as e:  # every rank reaches the agreement below, whatever failed
        error = e
    if _all_ok(error is None) and _rank() == 0:
        try:
            files_on_disk.seal(tmp, final, {STATE_FILE: state.to_json(), **files})
            files_on_disk.write_durable(root / LATEST, final.name)
        except Exception as e:
            error = e
    if not _all_ok(error is None):
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_save_failure(root, final, error)) from error
    return final


def _all_ok(ok: bool) -> bool:
    """Whether every rank succeeded (one tiny all-reduce; a barrier would hang on a failure)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([0.0 if ok else 1.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return float(flag) == 0.0


def _is_disk_full(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True  # torch DCP re-raises rank failures as text in a CheckpointException
        error = error.__cause__ or error.__context__
    return False


def _save_failure(root: Path, final: Path, error: BaseException | None) -> str:
    previous = files_on_disk.newest_complete(root)[0]
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint"
    if error is None:
        cause = "another rank failed (its log has the error)"
    elif _is_disk_full(error):
        free = shutil.disk_usage(root).free / 2**30
        cause = (
            f"no space left on the device of {root} ({free:.1f} GiB free); free space, lower "
            "checkpoint.keep_last or point checkpoint.dir at a larger filesystem"
        )
    else:
        cause = f"{type(error).__name__}: {error}"
    return (
        f"saving checkpoint {final.name} failed: {cause}. The partial {final.name}{TMP_SUFFIX} "
        f"was removed and {kept}; rerun to resume from it"
    )


def latest(root: Path) -> tuple[Path | None, list[str]]:
    """Newest *complete* checkpoint under ``root`` and a warning per newer incomplete one (see
    :func:`~indexcache_train.training.checkpoint_files.newest_complete`)."""
    return files_on_disk.newest_complete(root)


def read_state(d: Path) -> TrainerState:
    return TrainerState(**json.loads((d / STATE_FILE).read_text()))


@torch.no_grad()
def load(d: Path, chunks: list, optimizer: Any | None) -> TrainerState:
    """Load model (and optimizer, if given) in place; returns the trainer state."""
    from megatron.core import dist_checkpointing

    from indexcache_train.training.model_setup import init_optimizer_state

    state = read_state(d)
    if optimizer is not None:
        init_optimizer_state(optimizer)  # a fresh optimizer has no state to load into yet
    sharded = _sharded(chunks, optimizer, is_loading=True, optimizer_format=state.optimizer_format)
    loaded = dist_checkpointing.load(sharded, str(d))
    for i, c in enumerate(chunks):
        c.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])
    if optimizer is not None and state.optimizer_format == "fully_reshardable":
        _load_model_space_state(optimizer, loaded["optimizer"])
    elif optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    check_finite(chunks, d)
    return state


def _load_model_space_state(optimizer: Any, loaded: dict) -> None:
    """A ``fully_reshardable`` optimizer state into this layout's optimizer(s).

    Megatron's ``ChainedOptimizer.load_state_dict`` expects the saving layout's chaining (one
    optimizer at EP=1, a dense and an expert one at EP>1). The per-parameter state is keyed by
    parameter name, so each of this layout's optimizers takes its parameters' state from the part
    of ``loaded`` it requested; the only other state used is Adam's step (the learning rate is
    set every step, the betas come from the config)."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = [loaded[i] for i in range(len(subs))] if len(subs) > 1 else [loaded]
    steps = _saved_steps(loaded)
    if len(steps) != 1:
        raise CheckpointError(
            f"checkpoint optimizer state has Adam steps {sorted(steps)}; expected one"
        )
    (step,) = steps
    for opt, part in zip(subs, parts, strict=True):
        opt.load_parameter_state_from_fully_reshardable(part["param_state"])
        _set_adam_step(opt.optimizer, step)


def _saved_steps(state: Any) -> set[float]:
    """Adam steps of every ``param_groups`` entry in a loaded (nested) optimizer state."""
    if isinstance(state, dict):
        groups = state.get("param_groups") or []
        found = {float(g["step"]) for g in groups if isinstance(g, dict) and "step" in g}
        for key, value in state.items():
            if key != "param_groups":
                found |= _saved_steps(value)
        return found
    return set()


def _set_adam_step(inner: Any, step: float) -> None:
    """torch's Adam keeps ``step`` per parameter (bias correction); set it on every one."""
    for st in inner.state.values():
        if "step" in st:
            st["step"] = torch.tensor(step, dtype=torch.float32)


def check_resumable(d: Path, parallel: dict[str, Any]) -> None:
    """Refuse, before anything is loaded, to resume a ``dp_reshardable`` checkpoint under other
    model-parallel settings (its optimizer shards would not fit: Megatron fails deep inside the
    load with a shape mismatch). ``parallel``: this run's ``parallel`` config section."""
    import yaml

    state = read_state(d)
    config = d / RUN_CONFIG_FILE
    if state.optimizer_format != "dp_reshardable" or not config.is_file():
        return
    saved = (yaml.safe_load(config.read_text()) or {}).get("parallel", {})
    changed = {
        k: (saved.get(k), parallel.get(k))
        for k in MODEL_PARALLEL_KEYS
        if k in saved and saved.get(k) != parallel.get(k)
    }
    if changed:
        diff = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
        raise CheckpointError(
            f"{d} holds a dp_reshardable optimizer state, which resumes only at its own "
            f"model-parallel layout (any data-parallel size); this run changes {diff}. Resume "
            "at the saved layout with checkpoint.optimizer_format=fully_reshardable and save "
            "once (checkpoint.exit_after_steps=1), then resume that checkpoint under the new "
            "layout; or start from its weights alone with checkpoint.load_pretrained"
        )


def _restore_adam_steps(optimizer: Any) -> None:
    """Megatron 0.19.2 restores the common ``step`` into the param groups, but its
    ``dp_reshardable`` parameter-state load then copies the per-parameter ``step`` tensor of the
    freshly initialised state back over it (0), so Adam's bias correction would restart. Re-apply
    the checkpoint's step (exact resume depends on it)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        steps = {g["step"] for g in opt.optimizer.param_groups if "step" in g}
        if len(steps) == 1:
            _set_adam_step(opt.optimizer, float(steps.pop()))


@torch.no_grad()
def load_model_only(d: Path, chunks: list) -> None:
    """Initialise weights from a checkpoint (e.g. ``checkpoint_tools import`` output)."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(_sharded(chunks, None, is_loading=True), str(d))
    for i, c in enumerate(chunks):
        c.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])
    check_finite(chunks, d)


@torch.no_grad()
def check_finite(chunks: list, source: Path) -> None:
    """Refuse weights with NaN/inf right after loading them: training would report a
    non-finite loss at step 1 and blame the learning rate.

    Raises:
        CheckpointError: Names the first bad tensors and the checkpoint.
    """
    bad = [
        name
        for c in chunks
        for name, t in [*c.named_parameters(), *c.named_buffers()]
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    flag = torch.tensor([float(len(bad))], device=_device_of(chunks))
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops, not only the owner
    if float(flag) > 0:
        where = f"tensor(s) {bad[:5]}{' ...' if len(bad) > 5 else ''}" if bad else "another rank"
        raise CheckpointError(
            f"checkpoint {source} holds non-finite values (NaN/inf) in {where}: the checkpoint "
            "itself is broken, not the training settings. Re-create it (e.g. `python -m "
            "checkpoint_tools import` from the HF weights, whose values `python -m "
            "checkpoint_tools verify` checks) or load another one"
        )


def _device_of(chunks: list) -> torch.device:
    for c in chunks:
        for p in c.parameters():
            return p.device
    return torch.device("cpu")


def apply_retention(root: Path, keep_last: int, protected: set[str]) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (never ``protected`` or
    ``latest``; incomplete ones are not counted, so they never push a good one out)."""
    if _rank() != 0 or keep_last <= 0:
        return []
    done = [p for p in files_on_disk.step_dirs(root) if files_on_disk.incomplete_reason(p) is None]
    pointer = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    removed = []
    for p in done[:-keep_last]:
        if p.name in protected or p.name == pointer:
            continue
        shutil.rmtree(p)
        removed.append(p)
    return removed
