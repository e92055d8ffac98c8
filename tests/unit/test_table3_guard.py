"""The Table-3 driver's wall-clock guard and refusals (scripts/experiments/table3.py), with
stand-in training jobs (sleeping processes) instead of train.py: no model is built."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts/experiments"))

import table3
from table3_plan import Speeds, smoke_plan, with_overrides

SPARSE = {"name": "sparse", "steps": 2, "lr": 1e-4, "attention": "sparse", "trainable": "all"}


def _protocol(tmp_path: Path, monkeypatch, speeds: Speeds, **plan_changes) -> table3.Protocol:
    changes = {"budget_s": 6.0, "tail_reserve_s": 1.0, "report_reserve_s": 1.0, "stop_grace_s": 1.0}
    plan = with_overrides(smoke_plan(), **{**changes, "arm_steps": (1, 2), **plan_changes})
    args = argparse.Namespace(
        out=tmp_path / "out", work=tmp_path / "work", data_dir=None, no_plots=True,
        overwrite=False,
    )  # fmt: skip
    proto = table3.Protocol(plan, args)
    proto.out.mkdir()
    proto.work.mkdir()
    proto.sparse_stage = SPARSE
    proto.analysis.freq4_pattern = "FSSSFSSS"
    proto.analysis.search_state, proto.analysis.search_pattern = "done", "FSSFSSSS"
    launched: list[subprocess.Popen] = []

    def launch(name: str, experiment: str, overrides: list[str]):
        f = open(tmp_path / f"{name}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)"],
            stdout=f,
            start_new_session=True,
        )
        launched.append(proc)
        return proc, f

    monkeypatch.setattr(proto.launcher, "launch", launch)
    monkeypatch.setattr(proto, "measured_speeds", lambda: speeds)
    monkeypatch.setattr(proto, "base_checkpoint", lambda: tmp_path / "base_ckpt")
    proto.launched = launched
    return proto


def test_jobs_running_at_the_arms_deadline_are_stopped_and_the_rest_not_run(
    tmp_path: Path, monkeypatch
) -> None:
    proto = _protocol(tmp_path, monkeypatch, Speeds(0.001, 0.001, 0.0))
    proto.run_arms()  # the arms deadline is ~4 s after the protocol started
    assert proto.ledger.now() < 10
    status = {n: r["status"] for n, r in proto.runs.items()}
    assert list(status.values()).count("partial") == proto.plan.concurrency == 2
    assert set(status.values()) == {"partial", "not_run"}
    assert all(p.poll() is not None for p in proto.launched)  # killed, not left behind
    assert len(proto.launched) == 2
    doc = json.loads((proto.out / "results.json").read_text())
    assert {n: r["status"] for n, r in doc["runs"].items()} == status
    assert doc["phases"][-1]["status"] == "incomplete"
    assert all(
        r["reason"] == "the arms deadline came before it could start"
        for r in doc["runs"].values()
        if r["status"] == "not_run"
    )


def test_a_job_predicted_to_miss_the_deadline_is_not_started(tmp_path: Path, monkeypatch) -> None:
    proto = _protocol(tmp_path, monkeypatch, Speeds(10.0, 10.0, 0.0))
    proto.run_arms()
    assert proto.launched == []
    assert {r["status"] for r in proto.runs.values()} == {"not_run"}
    assert all("predicted to end" in r["reason"] for r in proto.runs.values())


def test_sigterm_stops_the_jobs_and_propagates(tmp_path: Path, monkeypatch) -> None:
    """An outer time limit (SIGTERM) stops the running jobs and marks the rest; main() then
    writes the report with what finished."""
    import os
    import signal
    import threading

    proto = _protocol(tmp_path, monkeypatch, Speeds(0.001, 0.001, 0.0), budget_s=60.0)
    previous = signal.signal(signal.SIGTERM, table3._on_sigterm)
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(table3.TerminatedError):
            proto.run_arms()
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert proto.ledger.now() < 30  # not the 58 s arms deadline
    assert len(proto.launched) == 2 and all(p.poll() is not None for p in proto.launched)
    reasons = {r["status"]: r["reason"] for r in proto.runs.values()}
    assert reasons == {
        "partial": "stopped at the protocol's interruption",
        "not_run": "the protocol's interruption came before it could start",
    }


@pytest.mark.parametrize(
    ("state", "pattern", "train_same", "want"),
    [
        ("failed", None, False, "not_run"),
        ("done", "FSSSFSSS", False, "same_as_d"),
        ("done", "FSSSFSSS", True, "ready"),
        ("done", "FSSFSSSS", False, "ready"),
        ("pending", None, False, "waiting"),
    ],
)
def test_arm_e_waits_for_the_search(tmp_path, monkeypatch, state, pattern, train_same, want):
    proto = _protocol(tmp_path, monkeypatch, Speeds(1, 1, 0), train_e_if_same=train_same)
    proto.analysis.search_state, proto.analysis.search_pattern = state, pattern
    job = table3.Job("e_s1", "e", 1)
    proto.ledger.update_run("e_s1", status="pending")
    pending = [job]
    got = proto._next_ready(pending)
    if want == "ready":
        assert got is job
    elif want == "waiting":
        assert got is None and pending == [job]
    else:
        assert got is None and pending == [] and proto.runs["e_s1"]["status"] == want


def test_refusals_before_any_compute(tmp_path: Path, capsys) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    assert table3.main(["--smoke", "--out", str(out), "--arm-steps", "3"]) == 2
    assert "expected W,S" in capsys.readouterr().err
    assert table3.main(["--smoke", "--out", str(out), "--seeds", "1,1"]) == 2
    assert "repeated seed" in capsys.readouterr().err
    out.mkdir()
    (out / "table.md").write_text("old")
    assert table3.main(["--smoke", "--out", str(out), "--work", str(work)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    work.mkdir()
    (work / "something").write_text("not ours")
    argv = ["--smoke", "--out", str(out), "--work", str(work), "--overwrite"]
    assert table3.main(argv) == 2
    assert "not made by this script" in capsys.readouterr().err
    assert (work / "something").read_text() == "not ours"  # never deleted
    assert table3.main([*argv[:-1], "--budget-s", "100", "--overwrite"]) == 2
    assert "leaves no time" in capsys.readouterr().err


def test_refusals_of_the_two_call_flags(tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "out")
    for argv, message in (
        (["--base-steps", "300"], "--base-steps '300': expected D,S"),
        (["--base-steps", "0,2"], "D and S must be >= 1"),
        (["--arms", "a,x"], "expected distinct arms from a,b,c,d,e"),
        (["--arms", "a,a"], "expected distinct arms"),
        (["--stop-after", "base", "--arm-steps", "2,2"], "--arm-steps would be ignored"),
    ):
        assert table3.main(["--smoke", "--out", out, *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "out").exists()  # refused before anything was written


TRAPS_SIGTERM = """
import signal, sys, time
def save(*_):
    open(sys.argv[1], "w").write("saved")
    sys.exit(0)
signal.signal(signal.SIGTERM, save)
time.sleep(120)
"""


def test_the_base_is_asked_to_stop_at_its_deadline_and_may_save(
    tmp_path: Path, monkeypatch
) -> None:
    """At the base deadline the trainer gets SIGTERM (it saves, then exits), not SIGKILL; the
    stopped base is marked (incomplete) for the next call to resume."""
    proto = _protocol(tmp_path, monkeypatch, Speeds(1, 1, 0), budget_s=10.0, stop_grace_s=5.0)
    proto.ledger.set("base_steps", [4, 2])
    saved = tmp_path / "saved"

    def launch(name: str, experiment: str, overrides: list[str]):
        f = open(tmp_path / f"{name}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-c", TRAPS_SIGTERM, str(saved)], stdout=f, start_new_session=True
        )
        proto.launched.append(proc)
        return proc, f

    marks: list[bool] = []
    monkeypatch.setattr(proto.launcher, "launch", launch)
    monkeypatch.setattr(proto, "_mark_base", marks.append)
    assert proto.plan.base_deadline_s == pytest.approx(3.0)  # 10 - 1 - 1 - 5 s of grace
    assert proto.run_base() is False
    assert saved.read_text() == "saved" and proto.launched[0].returncode == 0
    assert proto.ledger.now() < 8
    assert marks == [False]
    assert proto.runs["base"]["status"] == "partial"
    assert proto.runs["base"]["reason"] == "stopped at its deadline"


@pytest.mark.parametrize("state", ["complete", "stopped", "other", "missing"])
def test_reuse_base_decides_from_the_marker(tmp_path: Path, monkeypatch, state: str) -> None:
    import table3_base

    proto = _protocol(tmp_path, monkeypatch, Speeds(1, 1, 0), reuse_base=True)
    proto.base_inputs = {"base_steps": [4, 2]}
    proto.base_fp = table3_base.fingerprint(proto.base_inputs)
    trained: list[bool] = []
    monkeypatch.setattr(proto, "run_base", lambda *wall: trained.append(wall) or True)
    run = {"status": "done", "steps_done": 6, "steps_total": 6, "wall_s": 20.0}
    if state != "missing":
        fp = proto.base_fp if state != "other" else "0" * 16
        table3_base.write_marker(
            proto.work, fp, {"base_steps": [3, 2]}, complete=state != "stopped", steps_done=6,
            run=run,
        )  # fmt: skip
    assert proto.obtain_base() is True
    note = proto.ledger.results["notes"][-1]
    if state == "complete":
        assert trained == [] and "not retrained" in note
        assert proto.runs["base"]["wall_s"] == 20.0 and "reused" in proto.runs["base"]["reason"]
        assert proto.ledger.results["phases"][-1]["status"] == "reused"
    else:
        assert trained == [(20.0,) if state == "stopped" else ()]  # a resume counts its wall
        assert ("resuming" in note) == (state == "stopped")
        assert (proto.work / "base.json").exists() == (state == "stopped")  # else discarded
    if state == "other":
        assert "differs in: base_steps" in note


@pytest.mark.parametrize("cached", [{}, {"search": {"pattern": "FSFSSSSS"}}])
def test_base_analysis_recomputes_what_the_cache_lacks_on_clean_outputs(
    tmp_path: Path, monkeypatch, cached: dict
) -> None:
    """An earlier call's outputs of an analysis it did not finish are removed before it is run
    again (the tools refuse, or resume, another run's output directory); cached parts stay."""
    import table3_base

    proto = _protocol(tmp_path, monkeypatch, Speeds(1, 1, 0))
    proto.analysis.search_state, proto.analysis.search_pattern = "pending", None
    work = proto.work
    for d in ("hf/base", "search", "eval/base"):
        (work / d).mkdir(parents=True)
        (work / d / "old.json").write_text("{}")
    if cached:
        table3_base.update_analysis(work, "fp", 5, **cached)
    tasks: list[str] = []
    monkeypatch.setattr(proto.analysis.pool, "submit", lambda w, p, label, fn: tasks.append(label))
    proto.analysis.start_base(work / "ckpt/step_00000005", "base", "fp")
    assert tasks == ["export base"]
    assert not (work / "hf/base").exists() and not (work / "eval/base").exists()
    assert (work / "search").exists() == bool(cached)
    assert proto.analysis.search_state == ("done" if cached else "pending")


def test_the_base_fingerprint_covers_the_repeated_spans(tmp_path: Path, monkeypatch) -> None:
    """A base trained without (or with other) repeated spans is not reused: the data fields
    that shape samples are hashed, the machine-specific paths are not."""
    proto = _protocol(tmp_path, monkeypatch, Speeds(0.001, 0.001, 0.0))
    proto._check_configs()
    data = proto.base_inputs["data"]
    assert (data["repeat_fraction"], data["repeat_span"], data["repeat_count"]) == (0.5, 8, 16)
    assert "train_prefixes" not in data and "num_workers" not in data
