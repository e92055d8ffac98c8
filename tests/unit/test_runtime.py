"""Process setup: rank discovery from torchrun or Slurm, run ids, and a clean shutdown."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from indexcache_train.training.runtime import Ranks, discover_ranks, run_id

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_torchrun_variables_win_over_slurm() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
    }
    assert discover_ranks(env) == Ranks(3, 8, 1, "torchrun")


def test_plain_srun_one_task_per_gpu() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5"}
    assert discover_ranks(env) == Ranks(5, 16, 5, "slurm")


def test_single_slurm_task_is_a_single_process() -> None:
    # `srun python train.py` with one task (or an interactive allocation) is not a world of one
    # Slurm rank that needs MASTER_ADDR: it runs like `python train.py`.
    assert discover_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "single"
    assert discover_ranks({}) == Ranks(0, 1, 0, "single")


def test_run_id_is_stable_across_restarts() -> None:
    assert run_id({"INDEXCACHE_RUN_ID": "100", "SLURM_JOB_ID": "101"}) == "100"
    assert run_id({"SLURM_JOB_ID": "101"}) == "101"
    assert run_id({}) == "local"


def test_shutdown_releases_the_process_groups() -> None:
    # In a subprocess: the process group is global state other tests must not inherit.
    code = textwrap.dedent(
        """
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from indexcache_train.training import runtime
        device = runtime.init_process_group(runtime.Ranks(0, 1, 0, "single"))
        ps.initialize_model_parallel()
        runtime.shutdown()
        assert not dist.is_initialized()
        assert not ps.model_parallel_is_initialized()
        runtime.shutdown()  # a second call (or one without a group) is a no-op
        print("ok")
        """
    )
    # A fresh rendezvous: an earlier in-process test may hold the port its MASTER_PORT names.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
