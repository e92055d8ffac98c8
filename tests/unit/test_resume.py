"""Resuming a run directory: a meaning-changing config is refused (or allowed on purpose), the
run's ``run_config.yaml`` is never overwritten, stale temporaries are removed at start-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from indexcache_train.config.compose import compose, to_yaml
from indexcache_train.training.checkpointing import CheckpointError
from indexcache_train.training.resume import (
    ResumeError,
    config_changes,
    find_resume_point,
    prepare_run_dir,
)

TOY = ["+experiment=toy"]


def _fake_checkpoint(root: Path, step: int, overrides: list[str]) -> Path:
    """A complete-looking trainer checkpoint directory (state + the config it trained with)."""
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    state = {"step": step, "stage_index": 0, "consumed_train_samples": 4 * step, "reason": "x"}
    (d / "trainer_state.json").write_text(json.dumps(state))
    (d / "run_config.yaml").write_text(to_yaml(compose(TOY + overrides)))
    return d


def test_meaning_changing_keys_are_listed_and_harmless_ones_are_not() -> None:
    saved = to_yaml(compose(TOY))
    changed = compose(
        [
            *TOY,
            "optim.global_batch_size=8",
            "recipe.stages.1.steps=12",
            "run.seed=7",
            "indexcache.index_skip_topk_offset=2",
            # harmless: where/how things are logged, saved, laid out or computed
            "logging.log_interval=5",
            "checkpoint.save_interval=3",
            "optim.micro_batch_size=1",
            "optim.on_nonfinite=skip",
            "model.lm_loss_chunk=64",
            "data.num_workers=1",
        ]
    )
    assert config_changes(saved, changed) == [
        "indexcache.index_skip_topk_offset: 1 -> 2",
        "optim.global_batch_size: 4 -> 8",
        "recipe.stages.1.steps: 6 -> 12",
        "run.seed: 1234 -> 7",
    ]
    assert config_changes(saved, compose(TOY)) == []


def test_resume_with_a_changed_config_is_refused_naming_each_change(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 4, [])
    with pytest.raises(ResumeError) as e:
        find_resume_point(compose([*TOY, "optim.global_batch_size=8"]), tmp_path)
    msg = str(e.value)
    assert "step_00000004 (step 4) was trained with another config" in msg
    assert "optim.global_batch_size: 4 -> 8" in msg
    assert "checkpoint.allow_config_change=true" in msg


def test_allowed_change_resumes_and_keeps_both_configs(tmp_path: Path) -> None:
    ckpt = _fake_checkpoint(tmp_path / "checkpoints", 4, [])
    cfg = compose([*TOY, "recipe.stages.1.steps=12", "checkpoint.allow_config_change=true"])
    point = find_resume_point(cfg, tmp_path / "checkpoints")
    assert (point.directory, point.step, point.consumed_samples) == (ckpt, 4, 16)
    (tmp_path / "run_config.yaml").write_text("the fresh start's config\n")
    prepare_run_dir(cfg, tmp_path, tmp_path / "checkpoints", point)
    assert (tmp_path / "run_config.yaml").read_text() == "the fresh start's config\n"
    assert "steps: 12" in (tmp_path / "run_config.step00000004.yaml").read_text()


def test_plain_resume_does_not_rewrite_run_config(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path / "checkpoints", 4, [])
    cfg = compose([*TOY, "logging.log_interval=5"])  # harmless change
    point = find_resume_point(cfg, tmp_path / "checkpoints")
    (tmp_path / "run_config.yaml").write_text("original\n")
    prepare_run_dir(cfg, tmp_path, tmp_path / "checkpoints", point)
    assert (tmp_path / "run_config.yaml").read_text() == "original\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "run_config.yaml"]


def test_fresh_start_writes_run_config_and_removes_stale_temporaries(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    (root / "step_00000003.tmp").mkdir(parents=True)
    (root / "step_00000003.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (root / "latest.tmp").write_text("step_00000003")
    cfg = compose(TOY)
    point = find_resume_point(cfg, root)
    assert point.directory is None and point.step == 0
    prepare_run_dir(cfg, tmp_path, root, point)
    assert list(root.iterdir()) == []
    assert (tmp_path / "run_config.yaml").read_text() == to_yaml(cfg)


def test_auto_resume_off_over_existing_checkpoints_is_refused(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 4, [])
    with pytest.raises(ResumeError, match=r"auto_resume=false, but .* holds checkpoints"):
        find_resume_point(compose([*TOY, "checkpoint.auto_resume=false"]), tmp_path)


def test_missing_pretrained_checkpoint_is_found_before_the_model_is_built(tmp_path) -> None:
    cfg = compose([*TOY, f"checkpoint.load_pretrained={tmp_path / 'nowhere'}"])
    with pytest.raises(CheckpointError, match=r"nowhere: no Megatron checkpoint there"):
        find_resume_point(cfg, tmp_path / "checkpoints")
    # A resume does not read it (the run's own checkpoint wins).
    _fake_checkpoint(tmp_path / "checkpoints", 4, [f"checkpoint.load_pretrained={tmp_path}"])
    assert find_resume_point(cfg, tmp_path / "checkpoints").step == 4


def test_dp_reshardable_checkpoint_under_another_layout_is_refused_at_the_resume_point(
    tmp_path: Path,
) -> None:
    d = _fake_checkpoint(tmp_path, 4, [])  # no optimizer_format: written as dp_reshardable
    tp2 = compose([*TOY, "parallel.tensor_model_parallel_size=2"])
    with pytest.raises(CheckpointError, match=r"tensor_model_parallel_size: 1 -> 2"):
        find_resume_point(tp2, tmp_path)
    state = json.loads((d / "trainer_state.json").read_text())
    state["optimizer_format"] = "fully_reshardable"
    (d / "trainer_state.json").write_text(json.dumps(state))
    assert find_resume_point(tp2, tmp_path).step == 4
