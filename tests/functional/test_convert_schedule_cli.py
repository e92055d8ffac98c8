"""``python -m checkpoint_tools`` in a subprocess: convert-schedule, inspect, and an error exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from checkpoint_tools.validation import validate_hf_checkpoint
from tests.helpers.hf_toys import make_glm5_toy_config, save_toy_checkpoint


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "checkpoint_tools", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_convert_schedule_and_inspect(
    tmp_path: Path, subprocess_env: dict[str, str], repo_root: Path
) -> None:
    src = save_toy_checkpoint(make_glm5_toy_config(num_hidden_layers=6), tmp_path / "glm5")
    out = tmp_path / "glm5_freq4"
    convert = [
        "convert-schedule",
        "--hf",
        str(src),
        "--out",
        str(out),
        "--index-topk-freq",
        "4",
        "--index-skip-topk-offset",
        "3",
        "--shard-size",
        "50KB",
        "--no-progress",
    ]
    done = _run(convert, subprocess_env, repo_root)
    assert done.returncode == 0, done.stderr
    assert "pattern FFFSSS + MTP F" in done.stdout and "15 dropped" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["index_topk_freq"], config["index_skip_topk_offset"]) == (4, 3)
    assert validate_hf_checkpoint(out).ok
    assert (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer_config.json").exists()

    again = _run(convert, subprocess_env, repo_root)
    assert again.returncode == 2
    assert "output already exists" in again.stderr and "--overwrite" in again.stderr

    shown = _run(["inspect", "--hf", str(out), "--layers"], subprocess_env, repo_root)
    assert shown.returncode == 0, shown.stderr
    assert "freq 4 / offset 3" in shown.stdout and "layer   3: S<-2" in shown.stdout

    helped = _run(["--help"], subprocess_env, repo_root)
    assert (
        helped.returncode == 0
        and "convert-schedule" in helped.stdout
        and "inspect" in helped.stdout
    )
