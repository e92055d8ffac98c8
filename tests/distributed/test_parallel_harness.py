"""The multi-device equivalence harness (``scripts/bench/parallel_losses.py``) at CPU scale, under
gloo: it must pass on correct layouts and fail on each planted bug.

One harness call (``--scale cpu``): the toy pretrains 24 steps on the bundled corpus, then the
checked window (2 dense warm-up + 4 sparse steps) runs on one process (ref), on one process with
half-size micro-batches (the floor), and as TP=2+SP, CP=2, EP=2 (data-parallel dense parameters,
distributed optimizer) and PP=2 (trunk layers on both stages), each resuming ref's pretraining
checkpoint with its optimizer state (1 -> 2 processes, EP=1 -> 2), and with each bug of
``scripts/bench/plant.py`` planted: 10 ``train.py`` jobs. DP=2 alone, TP2xCP2, TP2xPP2 and the
mid-window resumes under another layout run in the GPU command, and on CPU with the harness's
defaults (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts/bench"))
from plant import PLANTS  # noqa: E402

RUNS = {"tp2sp": 6, "cp2": 6, "ep2": 6, "pp2": 6}  # run -> steps it logs
# One harness call of ~10 train.py launches (minutes on 2 CPU cores).
pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def harness(tmp_path_factory, subprocess_env) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("harness")
    cmd = [sys.executable, "scripts/bench/parallel_losses.py", "--out", str(out),
           "--scale", "cpu", "--layouts", "tp2sp,cp2,ep2,pp2", "--resumes", "none", "--plants", "all"]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=2400
    )
    report = out / "parallel_losses.json"
    assert report.is_file(), proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc, json.loads(report.read_text())


def test_harness_passes(harness) -> None:
    proc, _ = harness
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_window_starts_from_trained_weights(harness) -> None:
    _, report = harness
    first, last = report["pretrain_lm_first_last"]
    assert first > 10.5 and last < first - 1.5, (first, last)  # random init: ln(50304) = 10.8
    # The floor is a measurement (the micro-batch split moves the indexer gradients).
    assert report["floor_deviation"]["optim/indexer_grad_norm"]["max"] > 0


@pytest.mark.parametrize("run", sorted(RUNS))
def test_layout_matches_one_process(harness, run: str) -> None:
    _, report = harness
    r = report["results"][run]
    assert r["pass"] and r["steps"] == RUNS[run], r


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_planted_bug_fails_the_check(harness, plant: str) -> None:
    _, report = harness
    r = report["plants"][plant]
    # Caught, and not by a hair: some metric is >= 10x outside the tolerance.
    assert r["caught"] and max(r["ratio"].values()) >= 10, r
