"""Where metrics go: ``metrics.jsonl`` / ``eval.jsonl`` always, wandb and TensorBoard on request.

One path: the loop calls :meth:`MetricsLogger.log` once per record and every sink sits behind
that protocol (:func:`make_logger` fans out to the configured ones; ranks other than the
logging rank get a null logger). ``kind`` is ``train`` (one record per step) or ``eval`` (one
per evaluation).

A resumed run repeats the steps after its checkpoint, so the JSONL files are first cut back to
the checkpoint's step (rows after it, duplicates and a line a kill left half-written are
dropped): every step appears once, with the values of the run that the checkpoints continue.
TensorBoard gets the same cut through ``purge_step``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

__all__ = ["JsonlLogger", "MetricsLogger", "MultiLogger", "NullLogger", "make_logger"]

log = logging.getLogger("indexcache_train")

#: kind -> file under the run directory.
JSONL_FILES = {"train": "metrics.jsonl", "eval": "eval.jsonl"}


class MetricsLogger(Protocol):
    def log(self, kind: str, step: int, stage: str, metrics: dict[str, float]) -> None: ...
    def finish(self) -> None: ...


class NullLogger:
    """Ranks that do not log: no ``if rank == 0`` branches in the loop."""

    def log(self, kind: str, step: int, stage: str, metrics: dict[str, float]) -> None:
        pass

    def finish(self) -> None:
        pass


def _rows(path: Path) -> list[tuple[int, str]]:
    """``(step, line)`` of every well-formed row (a line a kill cut short is left out)."""
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append((int(json.loads(line)["step"]), line))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def last_row(path: Path) -> dict[str, Any]:
    """The last well-formed row of a JSONL metrics file (``{}`` if none)."""
    rows = _rows(path)
    return json.loads(rows[-1][1]) if rows else {}


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Keep the rows of ``path`` with ``step <= last_step``, one per step (the last written);
    returns how many rows were dropped. Atomic (temp file + rename)."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    rows = {step: line for step, line in _rows(path) if step <= last_step}  # last one wins
    kept = [rows[s] for s in sorted(rows)]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


class JsonlLogger:
    """``metrics.jsonl`` (every step) and ``eval.jsonl`` (every evaluation) in the run directory.

    Args:
        run_dir: The run directory.
        resume_step: The step the run continues from (rows after it are dropped); -1: a fresh
            run, whose directory keeps nothing of an earlier attempt that saved no checkpoint.
    """

    def __init__(self, run_dir: Path, resume_step: int) -> None:
        self.paths = {kind: run_dir / name for kind, name in JSONL_FILES.items()}
        for path in self.paths.values():
            dropped = truncate_jsonl(path, resume_step)
            if dropped:
                log.info(
                    "%s: dropped %d rows after step %d (resumed run)", path, dropped, resume_step
                )
        self._files = {kind: open(path, "a") for kind, path in self.paths.items()}

    def log(self, kind: str, step: int, stage: str, metrics: dict[str, float]) -> None:
        f = self._files[kind]
        f.write(json.dumps({"step": step, "stage": stage, **metrics}) + "\n")
        f.flush()  # a kill loses at most the line being written

    def finish(self) -> None:
        for f in self._files.values():
            f.close()


class WandbLogger:
    """Weights & Biases (optional package; validation checks it is installed)."""

    def __init__(self, project: str, name: str, mode: str, config: dict[str, Any], run_dir: Path):
        import wandb

        os.environ.setdefault("WANDB_MODE", mode)
        self._run = wandb.init(
            project=project,
            name=name,
            mode=mode,
            config=config,
            dir=str(run_dir),
            id=name.replace("/", "-"),
            resume="allow",
        )

    def log(self, kind: str, step: int, stage: str, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def finish(self) -> None:
        self._run.finish()


class TensorBoardLogger:
    """TensorBoard event files under ``<run_dir>/tensorboard`` (optional ``tensorboard``)."""

    def __init__(self, run_dir: Path, resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events an interrupted attempt wrote after the checkpoint.
        self._writer = SummaryWriter(
            log_dir=str(run_dir / "tensorboard"), purge_step=max(resume_step + 1, 0)
        )

    def log(self, kind: str, step: int, stage: str, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step)

    def finish(self) -> None:
        self._writer.close()


class MultiLogger:
    """Fan-out to several sinks, in order."""

    def __init__(self, sinks: list[MetricsLogger]) -> None:
        self.sinks = sinks

    def log(self, kind: str, step: int, stage: str, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(kind, step, stage, metrics)

    def finish(self) -> None:
        for sink in self.sinks:
            sink.finish()


def make_logger(
    cfg: Any, run_dir: Path, resume_step: int, config: dict[str, Any], is_logging_rank: bool
) -> MetricsLogger:
    """Every sink ``cfg.logging`` asks for (``cfg``: a ``TrainConfig``), on the logging rank.

    Args:
        cfg: The run's config.
        run_dir: The run directory.
        resume_step: The resumed checkpoint's step, -1 for a fresh run.
        config: The config as a plain dict (recorded by wandb).
        is_logging_rank: False: a :class:`NullLogger`.
    """
    if not is_logging_rank:
        return NullLogger()
    lg = cfg.logging
    sinks: list[MetricsLogger] = [JsonlLogger(run_dir, resume_step)]
    if lg.wandb_mode != "disabled":
        sinks.append(WandbLogger(lg.wandb_project, run_dir.name, lg.wandb_mode, config, run_dir))
    if lg.tensorboard:
        sinks.append(TensorBoardLogger(run_dir, resume_step))
    return MultiLogger(sinks)
