"""TP=2+SP, EP=2, DP=2 (and CP=2) on 2 gloo processes equal 1 process: loss and every gradient.

Toy: 4 layers (dense, MoE, MoE, MoE), freq 2 (FSFS) with a Full MTP layer, top-k 8 < seq 32, the
multi-layer distillation loss on; the sparse stage (trunk + indexers) and the dense warm-up
(indexers only, frozen trunk). Tolerances: loss <= 1e-6 relative, gradients <= 1e-5 relative
(norm-wise per tensor, floored at 1e-5 of the model's gradient norm; see the script).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "scripts/parallel_equivalence.py"


def _torchrun(n: int, args: list[str], env: dict[str, str], port: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", f"--master-port={port}",
           str(SCRIPT), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def work(tmp_path_factory, subprocess_env) -> Path:
    d = tmp_path_factory.mktemp("parallel_equivalence")
    for attention in ("sparse", "warmup"):
        out = _torchrun(1, ["reference", "--work", str(d), "--attention", attention], subprocess_env, 29631)
        assert out.returncode == 0, out.stderr[-3000:]
    return d


@pytest.mark.parametrize("attention", ["sparse", "warmup"])
@pytest.mark.parametrize("scenario", ["tp2sp", "ep2", "dp2"])
def test_parallel_equals_single_process(work: Path, scenario: str, attention: str, subprocess_env) -> None:
    out = _torchrun(2, ["parallel", "--work", str(work), "--scenario", scenario, "--attention", attention],
                    subprocess_env, 29632)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((work / f"result_{scenario}_{attention}.json").read_text())
    assert r["missing"] == []
    assert r["loss_rel"] <= 1e-6, r
    assert r["max_grad_rel"] <= 1e-5, r
