"""``python -m checkpoint_tools import|export|verify`` in a subprocess, one smoke test per verb."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_tools.validation import validate_hf_checkpoint
from tests.helpers.hf_toys import make_glm5_toy_config, read_all, save_toy_checkpoint


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "checkpoint_tools", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = make_glm5_toy_config(index_topk_freq=4, index_skip_topk_offset=3)
    return save_toy_checkpoint(config, tmp_path_factory.mktemp("toy") / "glm52")


def test_cli_import(
    toy: Path, tmp_path: Path, subprocess_env: dict[str, str], repo_root: Path
) -> None:
    out = tmp_path / "glm52-mcore"
    done = _run(
        ["import", "--hf", str(toy), "--out", str(out), "--no-progress"], subprocess_env, repo_root
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "peak RSS MiB" in done.stdout and "FFFS + MTP S" in done.stdout
    assert (out / "model_config.yaml").is_file() and (out / "metadata.json").is_file()
    assert json.loads((out / "import_metadata.json").read_text())["layout"]["world_size"] == 1


def test_cli_export(
    toy: Path, tmp_path: Path, subprocess_env: dict[str, str], repo_root: Path
) -> None:
    # The Megatron checkpoint is imported in-process (the import CLI has its own test).
    from checkpoint_tools.hf_io import HFCheckpoint
    from checkpoint_tools.import_megatron import plan_import, run_import
    from tests.helpers.megatron_env import init_single_process

    init_single_process()
    run_import(plan_import(HFCheckpoint(toy)), tmp_path / "mcore")
    out = tmp_path / "hf"
    args = [
        "export",
        "--ckpt",
        str(tmp_path / "mcore"),
        "--out",
        str(out),
        "--hf-ref",
        str(toy),
        "--shard-size",
        "200KB",
        "--no-progress",
    ]
    done = _run(args, subprocess_env, repo_root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert validate_hf_checkpoint(out).ok
    assert (out / "tokenizer_config.json").is_file()
    source, exported = read_all(toy), read_all(out)
    assert exported.keys() == source.keys()
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype
        assert exported[name].view(torch.uint8).equal(tensor.view(torch.uint8)), name
    again = _run(args, subprocess_env, repo_root)  # refuses to overwrite
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_cli_verify(
    toy: Path, subprocess_env: dict[str, str], repo_root: Path, tmp_path: Path
) -> None:
    args = ["verify", "--hf", str(toy), "--num-layers", "3", "--work-dir", str(tmp_path)]
    done = _run(args, subprocess_env, repo_root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "L1: PASS" in done.stdout and "L2: PASS" in done.stdout
    assert "verify: PASS" in done.stdout
    layer_rows = [line for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(layer_rows) == 3  # --num-layers 3: one row per compared layer
    assert list(tmp_path.iterdir()) == []
