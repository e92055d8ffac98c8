"""The Table-3 protocol end to end at toy size (issue #24): ``table3.py --smoke`` on CPU.

One seed, 4 + 2 base steps, 2 + 2 arm steps: base, every arm (a)-(e), the pattern search,
export + evaluation of every checkpoint (and of (a)-(c) after their warm-up), the transformers
check of (b)'s export, the table, the plots (or the note that matplotlib is missing) and the
tarball. What is checked is the structure of the outputs, not their values (a toy trained for
a few steps has nothing to rank).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "scripts/experiments/table3.py"
OUTPUTS = {"results.json", "table.md", "protocol.log", "runs.tar.gz"}
PLOTS = {"loss_vs_steps.png", "copy_vs_distance.png"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, subprocess_env) -> tuple[Path, dict, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("table3")
    out = subprocess.run(
        [sys.executable, str(DRIVER), "--smoke", "--out", str(root / "out"), "--work",
         str(root / "work")],
        env=subprocess_env, cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return root / "out", json.loads((root / "out/results.json").read_text()), out


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def test_outputs_fit_what_the_device_returns(smoke) -> None:
    out, results, proc = smoke
    files = {p.name for p in out.iterdir()}
    try:
        import matplotlib  # noqa: F401

        assert files == OUTPUTS | PLOTS
    except ImportError:
        assert files == OUTPUTS
        assert any("plots skipped" in n for n in results["notes"])
    assert len(files) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir())
    assert results["status"] == "complete" and "complete:" in proc.stdout


def test_every_phase_and_run_finished(smoke) -> None:
    _, results, _ = smoke
    assert [p["name"] for p in results["phases"]] == ["preflight", "base", "arms", "analysis tail"]
    assert all(p["status"] == "ok" for p in results["phases"])
    runs = results["runs"]
    assert set(runs) == {"base", "a_s1", "b_s1", "c_s1", "d_s1", "e_s1"}
    for name, run in runs.items():
        assert run["status"] == "done", (name, run)
        assert run["steps_done"] == run["steps_total"]
    sizing = results["sizing"]
    assert (sizing["warmup"], sizing["sparse"]) == (2, 2)
    assert all(_finite(v) for v in sizing["speeds"].values())
    # Warm-up arms train W + S steps, the training-free ones S.
    assert [runs[f"{a}_s1"]["steps_total"] for a in "abcde"] == [4, 4, 4, 2, 2]


def test_every_checkpoint_was_evaluated(smoke) -> None:
    _, results, _ = smoke
    search = results["search"]["pattern"]
    assert len(search) == 8 and search[0] == "F" and search.count("F") == 2
    assert set(results["reference"]) == {"base", "base@freq4", "base@searched"}
    assert results["reference"]["base@searched"]["pattern"] == search
    patterns = {"a": "FFFFFFFF", "b": "FSSSFSSS", "c": "FSSSFSSS", "d": "FSSSFSSS", "e": search}
    for arm, pattern in patterns.items():
        final = results["runs"][f"{arm}_s1"]["final"]
        assert final["pattern"] == pattern
        for key in ("loss", "copy_nll", "copy_nll_first", "l_multi", "val_lm_loss"):
            assert _finite(final[key]), (arm, key)
        assert set(final["copy_nll_by_distance"]) == {"16", "64"}
        assert set(final["buckets"]) == {"0-8", "8-32", "32-64", "64+"}
        assert (final["shared_recall"] is None) == (arm == "a")
        warm = results["runs"][f"{arm}_s1"].get("warmup_end")
        assert (warm is not None) == (arm in "abc")
        curve = results["runs"][f"{arm}_s1"]["curve"]
        assert curve["step"][0] == 0 and curve["step"][-1] == (4 if arm in "abc" else 2)
    assert results["base_quality"]["init_val_loss"] > results["base_quality"]["final_val_loss"]


def test_hf_check_and_summary(smoke) -> None:
    out, results, _ = smoke
    hf = results["hf_check"]
    assert hf["source"] == "b_s1" and hf["ok"] is True
    assert hf["diff_vs_fp32"] <= hf["tolerance"]
    summary = results["summary"]
    assert set(summary["arms"]) == set("abcde")
    assert all(s["loss"]["n"] == 1 and s["loss"]["std"] is None for s in summary["arms"].values())
    assert summary["gaps_pct"]["a"]["loss"] == 0.0
    table = (out / "table.md").read_text()
    for arm in "abcde":
        assert f"| ({arm}) " in table
    assert "## Orderings" in table and "## HF export check" in table


def test_tarball_holds_every_runs_metrics_and_evaluations(smoke) -> None:
    out, results, _ = smoke
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = set(tar.getnames())
    for run in results["runs"]:
        assert f"runs/{run}-local/metrics.jsonl" in names
        assert f"runs/{run}-local/eval.jsonl" in names
        assert f"logs/{run}.log" in names
    for ev in ("base", "a_s1", "b_s1", "e_s1", "a_s1@warmup"):
        assert f"eval/{ev}/results.json" in names
    assert "search/result.json" in names and "hfcheck/ours/results.json" in names


# ---------------------------------------------------------------------- two device calls
def _call(root: Path, out: str, env: dict, *flags: str) -> tuple[dict, str, str]:
    """One driver call into ``root/out`` on the shared ``root/work`` (as table3.sh: --overwrite);
    returns results.json, that call's protocol.log and table.md."""
    proc = subprocess.run(
        [sys.executable, str(DRIVER), "--smoke", "--no-plots", "--overwrite", "--out",
         str(root / out), "--work", str(root / "work"), *flags],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results, log, table = (
        (root / out / f).read_text() for f in ("results.json", "protocol.log", "table.md")
    )
    return json.loads(results), log, table


@pytest.fixture(scope="module")
def two_calls(tmp_path_factory, subprocess_env) -> dict:
    """Call A (the base and its analysis), call B (reuses both, trains (d) and (e)), call C
    (another --base-steps: the fingerprint differs, the base is retrained)."""
    root = tmp_path_factory.mktemp("table3_two")
    got = {"A": _call(root, "a", subprocess_env, "--stop-after", "base", "--base-steps", "3,2")}
    got["marker_A"] = json.loads((root / "work/base.json").read_text())
    got["B"] = _call(
        root, "b", subprocess_env, "--reuse-base", "--base-steps", "3,2", "--arms", "d,e"
    )
    got["C"] = _call(
        root, "c", subprocess_env, "--reuse-base", "--base-steps", "4,2", "--stop-after", "base"
    )
    got["marker_C"] = json.loads((root / "work/base.json").read_text())
    return got


def test_call_a_trains_the_base_and_its_analysis_only(two_calls) -> None:
    results, log, _ = two_calls["A"]
    assert results["status"] == "base only"
    assert [p["name"] for p in results["phases"]] == ["preflight", "base", "analysis tail"]
    assert set(results["runs"]) == {"base"} and results["runs"]["base"]["steps_total"] == 5
    assert set(results["reference"]) == {"base", "base@freq4", "base@searched"}
    assert "launch base" in log and "search: " in log
    marker = two_calls["marker_A"]
    assert marker["complete"] and marker["steps_done"] == 5
    assert marker["fingerprint"] == results["base_fingerprint"]


def test_call_b_reuses_the_base_and_its_analysis(two_calls) -> None:
    (a, _, _), (b, log, table) = two_calls["A"], two_calls["B"]
    assert b["status"] == "complete"
    assert "launch base" not in log and "export base" not in log and "search: " not in log
    assert "base analysis reused from the cache" in log
    assert any("not retrained" in n for n in b["notes"])
    assert b["phases"][1] == {**b["phases"][1], "name": "base", "status": "reused"}
    assert b["runs"]["base"]["wall_s"] == a["runs"]["base"]["wall_s"]  # call A's record
    assert set(b["runs"]) == {"base", "d_s1", "e_s1"}
    assert b["search"] == a["search"] and b["reference"] == a["reference"]
    assert b["base_quality"] == a["base_quality"]
    assert b["runs"]["e_s1"]["final"]["pattern"] == a["search"]["pattern"]
    base = a["reference"]["base"]["loss"]
    assert f"| base | `FFFFFFFF` | {base:.4f} |" in table  # call B's report shows call A's evals


def test_another_base_steps_retrains_the_base(two_calls) -> None:
    c, log, _ = two_calls["C"]
    assert c["status"] == "base only" and "launch base" in log
    assert any("differs in: base_steps" in n and "training the base" in n for n in c["notes"])
    assert c["runs"]["base"]["steps_total"] == 6
    assert two_calls["marker_C"]["fingerprint"] != two_calls["marker_A"]["fingerprint"]
