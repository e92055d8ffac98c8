"""Every parallel layout on 2 (or 4) GPUs (NCCL, bf16, the GPU kernels) against one GPU, through
``train.py``, with the measured floor, the resharded resumes and the planted bugs
(``scripts/bench/parallel_losses.py``; the CPU version is ``tests/distributed/test_parallel_harness.py``).
Needs corpus-v1 (``CORPUS_V1_DIR``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TWO_GPU = "dp2,tp2sp,cp2,ep2,pp2"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (a multi-GPU device kind)")
def test_layouts_match_one_gpu(tmp_path: Path) -> None:
    layouts = "all" if torch.cuda.device_count() >= 4 else TWO_GPU
    out = subprocess.run(
        [sys.executable, "scripts/bench/parallel_losses.py", "--out", str(tmp_path),
         "--layouts", layouts],
        cwd=REPO, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "parallel_losses.json").read_text())
    assert report["results"] and all(r["pass"] for r in report["results"].values()), report
    assert report["plants"] and all(r["caught"] for r in report["plants"].values()), report
