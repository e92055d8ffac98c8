"""Run a test module's kernel cases in a ``TRITON_INTERPRET=1`` subprocess and read its JSON.

Triton decides interpret-or-compile when a kernel is *decorated*, i.e. at import, and other tests
in the same process may already have imported the kernel modules without it; so each
interpreter test module runs itself as a script in a fresh process (its ``__main__`` block prints
its metrics as one JSON line) and asserts on those numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_interpreted(script: str | Path, timeout: float = 600) -> dict:
    """Run ``script`` under the Triton CPU interpreter; its last stdout line is the JSON result."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        TRITON_INTERPRET="1",
        TORCHDYNAMO_DISABLE="1",
    )
    proc = subprocess.run(
        [sys.executable, str(Path(script).resolve())],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main_guard(cases) -> None:
    """The ``__main__`` body of an interpreter test module: run ``cases()``, print its JSON."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    print(json.dumps(cases()))
