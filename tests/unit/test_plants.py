"""The planted bugs of the equivalence harness (``scripts/bench/plant.py``) point at functions that
exist and reach every module that imported them, so a seam that moves fails here, in seconds,
before the distributed harness test (which checks that each plant is caught)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts/bench"))
from parallel_losses import LAYOUTS  # noqa: E402
from plant import PLANTS, seam  # noqa: E402


@pytest.mark.parametrize("name", sorted(PLANTS))
def test_seam_exists_and_layout_is_known(name: str) -> None:
    plant = PLANTS[name]
    assert seam(plant)[1] is not None, plant
    assert plant.layout in LAYOUTS, plant


def test_install_reaches_modules_that_imported_the_function(subprocess_env) -> None:
    code = """
import sys
sys.path.insert(0, "scripts/bench")
import importlib
import megatron.core.distributed as package   # holds `finalize_model_grads` under its name
fmg = importlib.import_module("megatron.core.distributed.finalize_model_grads")
from indexcache_train.model import attention   # holds `RowSplit` under its own name
from indexcache_train.ops import row_split
import plant
# Held in a tuple: install() replaces every module-level name bound to the function, this
# script's own globals included.
originals = (fmg.finalize_model_grads, row_split.RowSplit.reduce)
assert plant.install("grad_scale") >= 2
assert package.finalize_model_grads is fmg.finalize_model_grads is not originals[0]
assert plant.install("tp_target") == 1
assert attention.RowSplit.reduce is row_split.RowSplit.reduce is not originals[1]
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=subprocess_env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]


def test_unknown_plant_is_refused(subprocess_env) -> None:
    out = subprocess.run(
        [sys.executable, "scripts/bench/plant.py", "no_such_bug", "+experiment=toy"],
        cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0 and "NAME one of" in out.stderr
