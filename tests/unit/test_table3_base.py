"""The Table-3 base across device calls (scripts/experiments/table3_base.py): fingerprint,
marker, analysis cache and what ``--overwrite --reuse-base`` keeps of a work dir."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts/experiments"))

import table3_base as tb

INPUTS = {"base_steps": [3, 2], "seed": 1234, "train.idx_sha256": "ab"}


def test_fingerprint_names_what_changed(tmp_path: Path) -> None:
    fp = tb.fingerprint(INPUTS)
    assert fp == tb.fingerprint(dict(reversed(INPUTS.items())))  # key order does not matter
    marker, why = tb.reusable(tmp_path, fp, INPUTS)
    assert marker is None and "no base marker" in why
    tb.write_marker(tmp_path, fp, INPUTS, complete=True, steps_done=5, run={"wall_s": 3.0})
    marker, why = tb.reusable(tmp_path, fp, INPUTS)
    assert marker["complete"] and marker["run"] == {"wall_s": 3.0} and "complete" in why
    other = {**INPUTS, "base_steps": [4, 2]}
    marker, why = tb.reusable(tmp_path, tb.fingerprint(other), other)
    assert marker is None and "differs in: base_steps" in why
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary name


def test_data_identity_follows_the_index_not_the_mtime(tmp_path: Path) -> None:
    for name in ("train", "val"):
        (tmp_path / f"{name}.bin").write_bytes(b"x" * 10)
        (tmp_path / f"{name}.idx").write_bytes(b"docs")
    prefixes = (str(tmp_path / "train"), str(tmp_path / "val"))
    before = tb.data_identity(prefixes)
    (tmp_path / "train.idx").write_bytes(b"docs")  # a fresh copy: new mtime, same content
    assert tb.data_identity(prefixes) == before
    (tmp_path / "val.idx").write_bytes(b"other")
    assert tb.data_identity(prefixes)["val.idx_sha256"] != before["val.idx_sha256"]


def test_analysis_cache_is_keyed_by_fingerprint_and_step(tmp_path: Path) -> None:
    tb.update_analysis(tmp_path, "fp1", 5, search={"pattern": "FSFSSSSS"})
    tb.update_analysis(tmp_path, "fp1", 5, reference={"base": {"loss": 6.0}})
    assert tb.load_analysis(tmp_path, "fp1", 5) == {
        "search": {"pattern": "FSFSSSSS"},
        "reference": {"base": {"loss": 6.0}},
    }
    assert tb.load_analysis(tmp_path, "fp2", 5) == {}
    assert tb.load_analysis(tmp_path, "fp1", 4) == {}  # another checkpoint of the base
    tb.update_analysis(tmp_path, "fp2", 5, search={"pattern": "FFSSSSSS"})  # replaces, no merge
    assert tb.load_analysis(tmp_path, "fp2", 5) == {"search": {"pattern": "FFSSSSSS"}}


def test_prune_keeps_the_base_and_deletes_the_rest(tmp_path: Path) -> None:
    files = [
        "base.json", "base_analysis.json", "runs/base-local/metrics.jsonl",
        "runs/base-local/checkpoints/step_00000005/x", "runs/a_s1-local/metrics.jsonl",
        "logs/base.log", "logs/a_s1.log", "hf/base/config.json", "hf/a_s1/config.json",
        "search/result.json", "eval/base/results.json", "eval/a_s1/results.json",
        "cache/base/i.npy", "cache/a_s1/i.npy", "protocol.log",
    ]  # fmt: skip
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    tb.prune(tmp_path, tb.kept_paths(tmp_path))
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted(f for f in files if "a_s1" not in f and f != "protocol.log")
    tb.discard(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "eval", "hf", "logs", "runs"]
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
