"""What a run prints: log setup, known upstream warnings filtered, the end-of-run summary.

Megatron-Core, torch and their optional backends print ~30 lines of deprecation and
"not installed, falling back" warnings per process, repeated by every rank, which bury the
step lines. :func:`quiet_upstream_warnings` (called before Megatron is imported) is the one
place they are filtered: the known ones below are dropped everywhere, and ranks other than 0
print no Python warnings at all (rank 0 prints the same ones). ``INDEXCACHE_ALL_WARNINGS=1``
turns the filtering off. Pure Python: importing this module imports neither torch nor Megatron.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from pathlib import Path

__all__ = ["end_of_run_summary", "quiet_upstream_warnings", "setup_logging"]

VERBOSE_ENV = "INDEXCACHE_ALL_WARNINGS"

#: (category, start of the message): upstream warnings every run prints, harmless here.
KNOWN_UPSTREAM_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # Optional fused backends; the torch fallbacks are what runs on CPU and in our GPU kernels'
    # absence of them (Megatron's own fallback, by design).
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"Apex is not installed"),
    (UserWarning, r"absl\.logging is not installed"),
    # Megatron 0.19.2 import / default-config side effects, not about our settings.
    (UserWarning, r"full scope is deprecated"),
    (UserWarning, r"MimoModelConfig is experimental"),
    # Megatron's DDP probes `.grad` of non-leaf views when it builds its buffers.
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor"),
    # Megatron 0.19.2 calls the torch 2.13-deprecated collective names.
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)`"),
    # torch DCP, loading a checkpoint in one process (checkpoint tools, tests).
    (UserWarning, r"torch\.distributed is disabled, unavailable or uninitialized"),
    (UserWarning, r"The argument order of load has been changed"),
)
#: Megatron log records (WARNING level) about its own internals, printed every run.
KNOWN_UPSTREAM_LOG_RECORDS = (
    r"DistributedDataParallel: full_param_layout not provided",
    r"MCore's async save is deprecated",
)


class _DropKnownRecords(logging.Filter):
    _pattern = re.compile("|".join(KNOWN_UPSTREAM_LOG_RECORDS))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._pattern.search(record.getMessage())


def _verbose(env: dict[str, str] | None) -> bool:
    return (os.environ if env is None else env).get(VERBOSE_ENV) == "1"


def quiet_upstream_warnings(rank: int, env: dict[str, str] | None = None) -> None:
    """Drop the known upstream warnings (all Python warnings on ranks other than 0), unless
    ``INDEXCACHE_ALL_WARNINGS=1``. Call before importing Megatron: many are import-time."""
    if _verbose(env):
        return
    if rank != 0:
        warnings.simplefilter("ignore")
        return
    for category, message in KNOWN_UPSTREAM_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def setup_logging(rank: int, env: dict[str, str] | None = None) -> None:
    """Timestamped lines on stderr: INFO on rank 0, WARNING elsewhere; Megatron's INFO chatter
    (every DDP bucket and optimizer setting) and its known internal warnings dropped."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        force=True,
    )
    logging.getLogger("megatron").setLevel(logging.WARNING)
    if not _verbose(env):
        for handler in logging.getLogger().handlers:
            handler.addFilter(_DropKnownRecords())


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.5g}"


def end_of_run_summary(
    *,
    step: int,
    total: int,
    metrics: dict[str, float],
    checkpoint: Path | None,
    out_dir: Path,
    stopped_early: bool,
) -> str:
    """A few lines for the end of the log: where the run is, its losses, and what to run next."""
    g = metrics.get
    lines = [
        f"run summary | {'stopped at' if stopped_early else 'finished'} step {step}/{total}"
        f" | lm loss {_fmt(g('loss/lm'))} | indexer loss {_fmt(g('loss/indexer'))}"
        f" | eval lm loss {_fmt(g('eval/lm_loss'))} | eval L_multi {_fmt(g('eval/l_multi'))}"
        f" | eval shared recall {_fmt(g('eval/shared_recall'))}",
        f"  metrics:    {out_dir / 'metrics.jsonl'} (eval: {out_dir / 'eval.jsonl'})",
        f"  checkpoint: {checkpoint if checkpoint else 'none saved'}",
    ]
    if stopped_early:
        lines.append("  next:       rerun the same command to resume from the checkpoint")
    elif checkpoint is not None:
        lines.append(
            "  next:       python -m checkpoint_tools export --ckpt "
            f"{checkpoint} --out {out_dir / 'hf'}"
        )
    return "\n".join(lines)
