"""Shared test setup: the compatibility module is applied before anything imports Megatron."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from indexcache_train import compat  # noqa: E402

compat.apply()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests under tests/<tier>/ get that tier's marker, so `-m` selection works per directory.
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in {"unit", "distributed", "functional", "gpu"}:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for child processes (torchrun, train.py, checkpoint tools)."""
    env = dict(os.environ)
    # In-process Megatron tests export MASTER_PORT & co.; a child (train.py, torchrun) must pick
    # its own rendezvous instead of colliding with this process's (EADDRINUSE).
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    return env
