"""Trainer checkpoints under faults: a stage with no update, a truncated latest checkpoint, a full
disk during a save, stale temporaries, fsync before rename, non-finite loaded weights."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from indexcache_train.config.compose import compose
from indexcache_train.config.validate import validate
from indexcache_train.training import checkpoint_files
from indexcache_train.training import checkpointing as ckpt
from indexcache_train.training.model_setup import build_chunks, wrap_stage
from tests.helpers.megatron_env import init_single_process

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def toy():
    """The toy's warm-up stage, wrapped, before any update (no optimizer state yet)."""
    init_single_process()
    cfg = compose(["+experiment=toy"])
    resolved = validate(cfg, 1)
    chunks, tcfg = build_chunks(cfg, resolved.model, None, CPU)
    wrapped = wrap_stage(cfg, chunks, tcfg, cfg.recipe.stages[0])
    return cfg, resolved, chunks, tcfg, wrapped


def _save(toy, root: Path, step: int) -> Path:
    *_, wrapped = toy
    modules = [c.module for c in wrapped.ddp_chunks]
    state = ckpt.TrainerState(step, 0, step * 4, "interval")
    return ckpt.save(root, modules, wrapped.optimizer, state, {"run_config.yaml": "x: 1\n"})


def test_a_stage_without_any_update_saves_and_loads(toy, tmp_path: Path) -> None:
    # Every step of the stage skipped (on_nonfinite=skip): no Adam state exists. Megatron's
    # DistributedOptimizer.state_dict asserted on that at the stage-end save.
    cfg, _, chunks, tcfg, _ = toy
    d = _save(toy, tmp_path, 4)
    fresh = wrap_stage(cfg, chunks, tcfg, cfg.recipe.stages[0])
    state = ckpt.load(d, [c.module for c in fresh.ddp_chunks], fresh.optimizer)
    assert state.step == 4
    steps = {
        float(st["step"])
        for opt in fresh.optimizer.chained_optimizers
        for st in opt.optimizer.state.values()
    }
    assert steps == {0.0}  # what torch's first update starts from


def test_truncated_latest_falls_back_to_the_previous_complete_checkpoint(toy, tmp_path) -> None:
    first = _save(toy, tmp_path, 1)
    second = _save(toy, tmp_path, 2)
    assert (tmp_path / "latest").read_text() == second.name
    assert ckpt.latest(tmp_path) == (second, [])
    shard = next(second.glob("*.distcp"))
    size = shard.stat().st_size
    os.truncate(shard, size - 100)
    found, warnings = ckpt.latest(tmp_path)
    assert found == first
    assert len(warnings) == 1 and str(second) in warnings[0]
    assert f"{shard.name} has {size - 100} bytes, {size} were written" in warnings[0]
    # An unreadable trainer state is incomplete too.
    (first / "trainer_state.json").write_text('{"step": 1, "stage_')
    assert ckpt.latest(tmp_path)[0] is None


def test_disk_full_during_save_removes_the_partial_directory(toy, tmp_path, monkeypatch) -> None:
    from megatron.core import dist_checkpointing

    previous = _save(toy, tmp_path, 1)

    def full_disk(state_dict, directory, *args, **kwargs):
        (Path(directory) / "__0_0.distcp").write_bytes(b"\0" * 1000)  # half-written shard
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dist_checkpointing, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError) as e:
        _save(toy, tmp_path, 2)
    msg = str(e.value)
    assert "saving checkpoint step_00000002 failed: no space left on the device" in msg
    assert f"the previous checkpoint {previous} is intact" in msg
    assert "checkpoint.keep_last" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]
    assert ckpt.latest(tmp_path) == (previous, [])


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    (tmp_path / "step_00000007.tmp").mkdir()
    (tmp_path / "step_00000007.tmp" / "__0_0.distcp").write_bytes(b"x")
    (tmp_path / "latest.tmp").write_text("step_00000007")
    (tmp_path / "step_00000005").mkdir()
    removed = checkpoint_files.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == ["latest.tmp", "step_00000007.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000005"]


def test_files_are_fsynced_before_the_rename(toy, tmp_path, monkeypatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", f"{src} -> {dst}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = _save(toy, tmp_path, 3)
    tmp = f"{final}.tmp"
    i = events.index(("replace", f"{tmp} -> {final}"))
    synced_before = {path for kind, path in events[:i] if kind == "fsync"}
    for name in ("trainer_state.json", "run_config.yaml", "metadata.json", "manifest.json"):
        assert f"{tmp}/{name}" in synced_before, name
    assert tmp in synced_before  # the directory's entries
    j = events.index(("replace", f"{tmp_path}/latest.tmp -> {tmp_path}/latest"))
    assert ("fsync", f"{tmp_path}/latest.tmp") in events[i:j]
    assert ("fsync", str(tmp_path)) in events[j:]


def test_non_finite_pretrained_weights_are_named(toy, tmp_path: Path) -> None:
    from megatron.core import dist_checkpointing

    _, _, chunks, _, _ = toy
    name, param = next(iter(chunks[0].named_parameters()))
    keep = param.detach().clone()
    with torch.no_grad():
        param[0].fill_(float("nan"))
    dist_checkpointing.save(chunks[0].sharded_state_dict(), str(tmp_path))
    with torch.no_grad():
        param.copy_(keep)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_model_only(tmp_path, chunks)
    msg = str(e.value)
    assert f"checkpoint {tmp_path} holds non-finite values" in msg and name in msg
    assert "learning rate" not in msg
    with torch.no_grad():
        param.copy_(keep)
