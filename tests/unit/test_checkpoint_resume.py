"""Trainer checkpoints: which optimizer format a checkpoint was written in, and the refusal to
resume a ``dp_reshardable`` one under another model-parallel layout (before anything loads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from indexcache_train.config.schema import ParallelSection
from indexcache_train.training import checkpointing as ckpt

SAVED = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1}


def _checkpoint(d: Path, optimizer_format: str | None) -> Path:
    d.mkdir()
    state = {"step": 3, "stage_index": 1, "consumed_train_samples": 12, "reason": "interval"}
    if optimizer_format is not None:
        state["optimizer_format"] = optimizer_format
    (d / ckpt.STATE_FILE).write_text(json.dumps(state))
    lines = [f"  {k}: {v}" for k, v in SAVED.items()]
    (d / ckpt.RUN_CONFIG_FILE).write_text("parallel:\n" + "\n".join(lines) + "\n")
    return d


def _parallel(**sizes: int) -> dict:
    from dataclasses import asdict

    return asdict(ParallelSection(**sizes))


def test_checkpoints_before_the_field_were_dp_reshardable(tmp_path: Path) -> None:
    assert ckpt.read_state(_checkpoint(tmp_path / "c", None)).optimizer_format == "dp_reshardable"


def test_dp_reshardable_resumes_only_at_its_model_parallel_layout(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path / "c", "dp_reshardable")
    ckpt.check_resumable(d, _parallel(tensor_model_parallel_size=2))  # same TP, any DP
    with pytest.raises(ckpt.CheckpointError, match="tensor_model_parallel_size: 2 -> 1") as e:
        ckpt.check_resumable(d, _parallel(tensor_model_parallel_size=1))
    assert "checkpoint.optimizer_format=fully_reshardable" in str(e.value)


def test_fully_reshardable_resumes_under_any_layout(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path / "c", "fully_reshardable")
    ckpt.check_resumable(d, _parallel(pipeline_model_parallel_size=2))


def test_unknown_format_is_a_config_error() -> None:
    from indexcache_train.config.schema import TrainConfig
    from indexcache_train.config.validate import ConfigError, check_logging

    cfg = TrainConfig()
    cfg.checkpoint.optimizer_format = "fully"
    with pytest.raises(ConfigError, match=r"checkpoint\.optimizer_format='fully'"):
        check_logging(cfg)
