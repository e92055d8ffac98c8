"""train.py under torchrun (2 gloo processes): DP=2, CP=2 (packed documents) and PP=2 (the
automatic share-group-aware layout) reproduce the single-process run's losses, including across
the warm-up -> sparse stage switch (which rebuilds DDP and the optimizer and all-reduces the
carried optimizer state)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARGS = ["+experiment=toy", "data.pack_documents=true", "logging.eval_iters=1"]


def _losses(root: Path) -> list[tuple[float, float]]:
    rows = [json.loads(x) for x in (root / "toy-local/metrics.jsonl").read_text().splitlines()]
    return [(r["loss/lm"], r["loss/indexer"]) for r in rows]


def _run_single(root: Path, env: dict[str, str], *extra: str) -> None:
    out = subprocess.run(
        [sys.executable, "train.py", *ARGS, f"run.root={root}", *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]


def _run_two(root: Path, env: dict[str, str], *extra: str) -> str:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--master-port=29671",
        "train.py",
        *ARGS,
        *extra,
        f"run.root={root}",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


@pytest.fixture(scope="module")
def single_root(tmp_path_factory, subprocess_env) -> Path:
    root = tmp_path_factory.mktemp("single")
    _run_single(root, subprocess_env)
    return root


@pytest.fixture(scope="module")
def single(single_root) -> list[tuple[float, float]]:
    return _losses(single_root)


@pytest.mark.parametrize("parallel", [[], ["parallel.context_parallel_size=2"]], ids=["dp2", "cp2"])
def test_two_processes_match_one(single, parallel, tmp_path, subprocess_env) -> None:
    _run_two(tmp_path, subprocess_env, *parallel)
    got = _losses(tmp_path)
    assert len(got) == len(single) == 10
    for (lm, kl), (lm_ref, kl_ref) in zip(got, single):
        # fp32 summation order differs across layouts; under CP, Megatron's MTP loss uses
        # rank-local token counts (see tests/distributed/scripts/parallel_equivalence.py).
        assert lm == pytest.approx(lm_ref, rel=1e-5)
        assert kl == pytest.approx(kl_ref, rel=2e-3)


def test_pipeline_two_stages_match_one(single_root, tmp_path, subprocess_env) -> None:
    # Megatron initialises each pipeline stage from its own RNG stream, so PP=2 and PP=1 start
    # from different random weights; both start from the same checkpoint instead (the single
    # run's warm-up end, loaded model-only and resharded by dist-checkpointing).
    ckpt = single_root / "toy-local/checkpoints/step_00000004"
    _run_single(tmp_path / "pp1", subprocess_env, f"checkpoint.load_pretrained={ckpt}")
    log = _run_two(
        tmp_path / "pp2", subprocess_env, "parallel=pp2", f"checkpoint.load_pretrained={ckpt}"
    )
    # The automatic layout puts the whole FS FS trunk on stage 0 and the MTP layer (its own
    # Full group) with the loss on stage 1: no share group straddles the split.
    assert "pipeline layout: Et*4|mL" in log
    ref, got = _losses(tmp_path / "pp1"), _losses(tmp_path / "pp2")
    assert len(got) == len(ref) == 10
    for (lm, kl), (lm_ref, kl_ref) in zip(got, ref):
        assert lm == pytest.approx(lm_ref, rel=1e-6)
        assert kl == pytest.approx(kl_ref, rel=1e-4)
