"""The Table-3 results ledger (scripts/experiments/table3_runtime.py): concurrent snapshots."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts/experiments"))

import table3_runtime
from table3_runtime import Ledger

pytestmark = pytest.mark.unit


def test_concurrent_snapshots_write_one_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """The driver and the analysis workers snapshot at once (#24's GPU run: two writers shared a
    temporary name and one rename failed). Writes are serialised, and the last snapshot taken
    is the one on disk."""
    inside, most = 0, 0
    guard = threading.Lock()
    real = table3_runtime.write_atomic

    def slow_write(path: Path, data: bytes) -> None:
        nonlocal inside, most
        with guard:
            inside += 1
            most = max(most, inside)
        time.sleep(0.02)  # long enough for another thread's snapshot to arrive mid-write
        real(path, data)
        with guard:
            inside -= 1

    monkeypatch.setattr(table3_runtime, "write_atomic", slow_write)
    ledger = Ledger(tmp_path, {"mode": "gpu"})
    errors: list[BaseException] = []

    def snap(i: int) -> None:
        try:
            ledger.note(f"n{i}")
            ledger.snapshot()
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=snap, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and most == 1
    doc = (tmp_path / "results.json").read_text()
    assert all(f'"n{i}"' in doc for i in range(4))  # the last write holds every note
    assert not list(tmp_path.glob(".*.tmp"))
