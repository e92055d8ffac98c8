"""Merging several Table-3 calls on one base (scripts/experiments/table3_merge.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts/experiments"))

import table3_merge
from table3_merge import MergeError, merge

pytestmark = pytest.mark.unit

EVAL = {"seq": 8192, "docs": 8}


def _run(arm: str, seed: int, loss: float, status: str = "done") -> dict:
    final = {"loss": loss, "shared_recall": 0.3} if status == "done" else None
    return {"arm": arm, "seed": seed, "status": status, "final": final}


def _call(seeds: tuple[int, ...], fp: str = "fp1", steps=(8, 8), **runs_extra) -> dict:
    runs = {"base": {"arm": "base", "seed": None, "status": "done"}}
    for s in seeds:
        for arm, loss in (("a", 5.0), ("b", 5.01), ("c", 5.1)):
            runs[f"{arm}_s{s}"] = _run(arm, s, loss + 0.01 * s)
    runs.update(runs_extra)
    return {
        "mode": "gpu",
        "base_fingerprint": fp,
        "plan": {"eval": EVAL},
        "sizing": {"warmup": steps[0], "sparse": steps[1]},
        "runs": runs,
        "notes": [],
        "wall_s": 400.0,
        "budget_s": 500.0,
    }


def _dirs(tmp_path: Path, *docs: dict) -> list[tuple[Path, dict]]:
    return [(tmp_path / f"call{i}", d) for i, d in enumerate(docs)]


def test_disjoint_seeds_pool_into_one_table(tmp_path: Path) -> None:
    # (d) seed 3 did not fit call 0 (not_run); call 1 ran it with seeds 4, 5.
    c0 = _call((1, 2, 3), d_s1=_run("d", 1, 5.2), d_s3=_run("d", 3, 0, "not_run"))
    c1 = _call((4, 5), d_s3=_run("d", 3, 5.25))
    merged = merge(_dirs(tmp_path, c0, c1))
    arms = merged["summary"]["arms"]
    assert arms["a"]["loss"]["n"] == 5 and arms["b"]["loss"]["n"] == 5
    assert arms["d"]["loss"]["n"] == 2  # d_s1 from call 0, d_s3 from call 1
    assert merged["runs"]["d_s3"]["status"] == "done"
    assert merged["status"] == "merged" and merged["wall_s"] == 800.0


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (_call((4,), fp="fp2"), "differ in base fingerprint"),
        (_call((4,), steps=(8, 24)), "differ in arm steps"),
        ({**_call((4,)), "plan": {"eval": {**EVAL, "docs": 4}}}, "differ in evaluation"),
        (_call((3,)), r"run a_s3 finished in both"),
    ],
)
def test_incomparable_calls_are_refused(tmp_path: Path, second: dict, message: str) -> None:
    with pytest.raises(MergeError, match=message):
        merge(_dirs(tmp_path, _call((1, 2, 3)), second))


def test_the_cli_refuses_a_directory_without_results_and_writes_the_report(
    tmp_path: Path, capsys
) -> None:
    calls = []
    for i, seeds in enumerate(((1, 2), (3,))):
        d = tmp_path / f"c{i}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(_call(seeds)))
        calls.append(str(d))
    out = tmp_path / "merged"
    assert table3_merge.main([*calls, str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "nothing: no results.json" in capsys.readouterr().err and not out.exists()
    assert table3_merge.main([*calls, "--out", str(out), "--no-plots"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["summary"]["arms"]["c"]["loss"]["n"] == 3
    assert "merged from" in (out / "table.md").read_text()
