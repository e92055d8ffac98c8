"""Timing, memory and table helpers shared by the benchmarks (timing and memory need CUDA)."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def _import_this_checkout_unless_pythonpath_has_one() -> None:
    """``indexcache_train`` from ``PYTHONPATH`` when it holds one (e.g. an older tree measured
    with this tree's scripts: ``PYTHONPATH=.baseline``), else from this checkout."""
    entries = [Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not any((p / "indexcache_train" / "__init__.py").is_file() for p in entries):
        sys.path.insert(0, str(REPO))


_import_this_checkout_unless_pythonpath_has_one()

GIB = float(1 << 30)
OOM = "OOM"


def time_ms(
    fn: Callable[[], object], budget_ms: float = 400.0, min_reps: int = 3, max_reps: int = 50
) -> float:
    """Median wall time of ``fn`` in ms over CUDA events, after one warm-up call.

    The repeat count adapts to the first timed call so large sizes stay inside the lease.
    """
    fn()
    torch.cuda.synchronize()
    times: list[float] = []
    n = min_reps
    i = 0
    while i < n:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
        if i == 0:
            n = max(min_reps, min(max_reps, int(budget_ms / max(times[0], 1e-3))))
        i += 1
    return statistics.median(times)


def peak_gib(fn: Callable[[], object]) -> float:
    """Peak allocated GiB (inputs included) while ``fn`` runs once."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB


def attempt(fn: Callable[[], object]) -> object:
    """``fn()`` or the string ``"OOM"`` when the GPU runs out of memory (then frees the cache)."""
    try:
        return fn()
    except torch.OutOfMemoryError as e:
        print(oom_line(e), flush=True)
        free()
        return OOM


def repo_frame(frames: list[dict], none: str = "(no repo / Megatron frame)") -> str:
    """``file:line function`` of the first frame of this repo or Megatron in ``frames``
    (innermost first: ``{"filename", "line", "name"}``, as the allocator's trace records them)."""
    for f in frames:
        name = f.get("filename", "")
        if "indexcache_train" in name or "megatron" in name or "scripts/bench" in name:
            short = name.split("indexcache_train/")[-1].split("megatron/")[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    return none


def oom_line(e: BaseException) -> str:
    """The allocator's own account of an OOM (``Tried to allocate ...; ... reserved but
    unallocated``) and the innermost frame of this repo or Megatron that asked: a bare "OOM"
    cannot tell a too-large request from fragmentation."""
    import traceback

    frames = [
        {"filename": fs.filename, "line": fs.lineno, "name": fs.name}
        for fs in reversed(traceback.extract_tb(e.__traceback__))
    ]
    text = " ".join(str(e).split())
    return f"OOM at {repo_frame(frames, none='?')}: {text[:400]}"


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fmt(x: object, digits: int = 1) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def device_line() -> str:
    if not torch.cuda.is_available():
        return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}: smoke run, no timings"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name} ({p.total_memory / GIB:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"


def git_rev() -> str:
    """The commit measured: ``$IC_COMMIT`` (set by the device command: the device machine gets
    the working tree without ``.git``), else ``git rev-parse``, with ``+uncommitted`` only when
    the tree differs from that commit."""
    if rev := os.environ.get("IC_COMMIT"):
        return rev
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        rev, dirty = "", ""
    if not rev:
        return "unknown"
    return rev + ("+uncommitted" if dirty else "")


def autotune_report(*kernels: object) -> str:
    """The config each autotuned kernel picked, per autotune key (printed with the tables)."""
    lines = []
    for k in kernels:
        name = getattr(getattr(k, "fn", None), "__name__", str(k))
        for key, cfg in getattr(k, "cache", {}).items():
            lines.append(f"{name} {key[:6]}: {cfg}")
    return "\n".join(lines)


def save(name: str, payload: dict) -> None:
    """Write ``payload`` as JSON under ``$BENCH_JSON_DIR`` (default ``outputs/bench``).

    Not ``$OUT`` on the device: that folder returns at most 8 files, kept for the logs.
    """
    out = Path(os.environ.get("BENCH_JSON_DIR", REPO / "outputs" / "bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))


def write_json(path: Path, payload: object) -> None:
    """Atomic: a reader, or a run killed by its timeout, never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)
