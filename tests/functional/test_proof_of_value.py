"""Proof of value, CI-sized (issue #4): ``scripts/experiments/proof_of_value.py --quick`` runs the
three jobs (all-Full DSA pretraining, then the multi-layer vs own-layer warm-up and the same sparse
stage), its curves are compared with golden files, and the qualitative claims that hold at this
scale are asserted.

At this scale (70 pretraining steps on 4 x 128 tokens) the attention of the toy is far less
structured than in the full run (docs/LOG.md): the multi warm-up cuts L_multi by ~25%, not the
>= 50% of the full-size GLM-5.2-schedule run, because layer 0's singleton group (its own-layer
KL, which no warm-up mode improves much) dominates the Full-layer mean. So the ">= 50%" claim is
*not* asserted here; what is asserted is that the multi warm-up optimises L_multi and the
own-layer warm-up does not, and that the Shared layers' KL and recall are much better with multi.

Regenerate the golden files (after a deliberate numerics change only, saying why):
``UPDATE_GOLDEN=1 pytest tests/functional/test_proof_of_value.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "scripts/experiments/proof_of_value.py"
GOLDEN_DIR = REPO / "tests/assets/losses"
RUNS = ("pov_pretrain", "pov_multi", "pov_own_layer")
# Same machine: the runs are bit-identical (single process, OMP_NUM_THREADS=1, fixed seeds and
# data order). Across CPU instruction sets fp32 reductions differ in the last bits and ~100
# training steps amplify that; KL terms and recall also move when a near-tied top-k slot flips.
# A real change of the loss or of its scaling moves these curves by far more (the frozen-trunk
# warm-up bug fixed with this test left L_multi flat during the warm-up).
LM_RTOL = 1e-3  # LM losses (train per step, held-out per evaluation)
KL_RTOL = 3e-2  # indexer losses, L_multi, Shared-layer KL, recall


@pytest.fixture(scope="module")
def pov(tmp_path_factory, subprocess_env) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("pov")
    out = subprocess.run(
        [sys.executable, str(DRIVER), "--quick", "--root", str(root)],
        env=subprocess_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root, json.loads((root / "pov_results.json").read_text())


def _curves(root: Path, name: str) -> dict:
    return json.loads((root / f"{name}-local/curves.json").read_text())


def _compact(c: dict) -> dict:
    """What the golden keeps: per-step training losses and the headline eval curves."""
    keep = ("step", "stage", "eval/lm_loss", "eval/l_multi", "eval/shared_kl", "eval/shared_recall")
    return {"train": c["train"], "eval": {k: v for k, v in c["eval"].items() if k in keep}}


@pytest.mark.parametrize("name", RUNS)
def test_curves_match_golden(pov, name: str) -> None:
    root, _ = pov
    got = _compact(_curves(root, name))
    golden_file = GOLDEN_DIR / f"{name}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden_file.write_text(json.dumps(got, indent=1) + "\n")
    golden = json.loads(golden_file.read_text())
    for part in ("train", "eval"):
        assert (
            got[part]["step"] == golden[part]["step"]
            and got[part]["stage"] == golden[part]["stage"]
        )
        for key, values in golden[part].items():
            if key in ("step", "stage"):
                continue
            rtol = LM_RTOL if key in ("loss/lm", "eval/lm_loss") else KL_RTOL
            assert got[part][key] == pytest.approx(values, rel=rtol, nan_ok=True), (
                f"{name} {part} {key}"
            )


def test_multi_warmup_optimises_l_multi_and_own_layer_does_not(pov) -> None:
    _, summary = pov
    m, o = summary["table"]["multi"], summary["table"]["own_layer"]
    assert m["l_multi_start"] == o["l_multi_start"]  # same checkpoint, same held-out batches
    # Measured: multi -25%, own_layer +3% (it fits each Full layer to itself, not to its group).
    assert m["l_multi_cut"] >= 0.15
    assert m["l_multi_cut"] - o["l_multi_cut"] >= 0.15
    assert o["l_multi_cut"] <= 0.05


def test_multi_beats_own_layer_on_shared_layers(pov) -> None:
    _, summary = pov
    m, o = summary["table"]["multi"], summary["table"]["own_layer"]
    # Measured after the warm-up: KL 0.0030 vs 0.0149, recall 0.75 vs 0.35.
    assert m["shared_kl_end_warmup"] < 0.5 * o["shared_kl_end_warmup"]
    assert m["shared_recall_end_warmup"] > o["shared_recall_end_warmup"] + 0.1
    assert m["shared_recall_end"] > o["shared_recall_end"]
    # The own-layer ablation keeps its Full layers closer to their own attention.
    assert m["full_recall_end"] < o["full_recall_end"]
