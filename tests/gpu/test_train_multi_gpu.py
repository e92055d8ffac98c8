"""DP=2, TP=2+SP and CP=2 on two GPUs (NCCL, bf16, the GPU kernels) against one GPU, through
``train.py`` for 20 steps across the stage switch (``scripts/bench/parallel_losses.py``; the
tolerances and the measured one-GPU bf16 floor are in its report)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (a 2-GPU device kind)")
def test_two_gpu_layouts_match_one_gpu(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "scripts/bench/parallel_losses.py", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    report = json.loads((tmp_path / "parallel_losses.json").read_text())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in ("dp2", "tp2sp", "cp2"):
        r = report["results"][name]
        assert r["pass"] and r["steps"] == 20 and r["stages"] == ["sparse", "warmup"], r
