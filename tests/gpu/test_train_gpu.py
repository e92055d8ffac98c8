"""The trainer on one GPU: the toy in bf16 through the GPU kernels (forced, not auto), warm-up
then sparse, checkpoint + exact-step resume bookkeeping."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _train(root: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "+experiment=toy_gpu",
        f"run.root={root}",
        "model.kernel_backend=triton",
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_toy_gpu_trains_with_kernels_and_resumes(tmp_path: Path) -> None:
    out = _train(tmp_path, "checkpoint.exit_after_steps=6")
    assert out.returncode == 0, out.stderr[-4000:]
    out = _train(tmp_path)
    assert out.returncode == 0 and "resumed from" in out.stderr, out.stderr[-4000:]
    rows = [
        json.loads(x) for x in (tmp_path / "toy_gpu-local/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["stage"] for r in rows] == ["warmup"] * 4 + ["sparse"] * 6
    assert all(math.isfinite(r["loss/lm"]) and math.isfinite(r["loss/indexer"]) for r in rows)
    assert rows[-1]["memory/gib"] > 0 and rows[-1]["throughput/tflops_per_gpu"] > 0
