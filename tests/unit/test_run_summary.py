"""``scripts/bench/run_summary.py`` on a crashed-and-resumed run's ``metrics.jsonl``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts/bench/run_summary.py"


def _module():
    spec = importlib.util.spec_from_file_location("run_summary", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _row(step: int, stage: str, lm: float, **extra) -> str:
    base = {
        "step": step,
        "stage": stage,
        "loss/lm": lm,
        "loss/indexer": 0.1,
        "throughput/step_time_s": 1.0,
        "throughput/tokens_per_s_per_gpu": 100.0,
        "throughput/tflops_per_gpu": 1.0,
        "memory/gib": 2.0,
    }
    return json.dumps({**base, **extra}) + "\n"


def test_repeated_steps_count_once_and_cut_lines_are_skipped(tmp_path: Path) -> None:
    # Steps 1-4 of a run killed after step 4 that resumed from step 2: 3 and 4 appear twice
    # (the first attempt's values 9.0, the resumed run's 3.0 / 4.0), the kill cut a line, and
    # an old row lacks the throughput keys.
    text = (
        _row(1, "a", 1.0)
        + _row(2, "a", 2.0)
        + _row(3, "a", 9.0)
        + _row(4, "a", 9.0)
        + '{"step": 5, "stage": "a", "lo'
        + "\n"
        + _row(3, "a", 3.0)
        + _row(4, "a", 4.0)
        + json.dumps({"step": 5, "stage": "a", "loss/lm": 5.0, "loss/indexer": 0.1})
        + "\n"
    )
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    mod = _module()
    rows, bad = mod.read_rows(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and bad == 1
    (summary,) = mod.summarize(rows, window=2)
    assert summary["steps"] == 5
    assert summary["lm_last"] == 4.5  # (4 + 5) / 2: the resumed values, not 9.0
    assert summary["peak_gib"] is None  # the last row has no memory metric
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "| a | 5 |" in out.stdout and "skipped 1 unreadable line" in out.stderr
