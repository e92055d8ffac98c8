"""Training-free greedy F/S pattern search (IndexCache paper, Algorithm 1), model-independent.

The search only needs ``evaluate(pattern) -> LM loss`` on fixed calibration batches; the model
side lives in :mod:`indexcache_train.tools.search_cli`. Algorithm (paper arXiv 2603.12201,
Algorithm 1, "training-free IndexCache")::

    pattern = "F" * num_layers                       # start all-Full
    while count("F") > target_full:
        for every Full layer j except layer 0:       # layer 0 has no earlier source
            loss_j = evaluate(pattern with j -> S)
        commit the j with the lowest loss_j          # ties: the lowest layer index

Pipeline-blocked variant (``blocks = P > 1``), our reading of the paper's pipeline-friendly
search, stated exactly:

* The layers are split into P contiguous blocks as evenly as possible (the first
  ``num_layers % P`` blocks are one layer longer). Each block's first layer is fixed Full, so a
  pipeline split at block boundaries never separates a Shared layer from its source.
* Each block gets a quota of Full layers: 1 (its first layer) plus a share of the remaining
  ``target_full - P`` given out one at a time to the block furthest below its proportional
  share ``size_b * target_full / num_layers`` (ties: lower block). Quotas sum to
  ``target_full``.
* Each step evaluates every candidate flip of every block still above its quota, each with the
  current pattern everywhere else (so with the other blocks unchanged); each such block then
  commits its own best flip, all in one step. The step's loss is the loss of the pattern with
  all of that step's flips, evaluated once more (for P = 1 it is the best candidate's loss).

Log (``log_path``, JSON lines; append + flush + fsync per record, so a crash loses at most the
record being written):

* ``{"kind": "header", ...}``: num_layers, target_full, blocks and caller metadata (model, data).
* ``{"kind": "eval", "step", "pattern", "loss"}``: every evaluation, as soon as it is done.
* ``{"kind": "commit", "step", "flips", "pattern", "loss", "candidates"}``: each step's commit.

Resuming replays the algorithm with the logged evaluations as a cache, so committed steps (and
the evaluations already done in an interrupted step) are never evaluated again, and the result
is the pattern the uninterrupted search reaches. A torn last line (a crash mid-write) is dropped;
a log of another search (header mismatch) or a replay that disagrees with a logged commit is
refused with :class:`SearchLogError`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOG_VERSION = 1

Evaluate = Callable[[str], float]


class SearchError(ValueError):
    """Invalid search request (target, blocks); the message names the fix."""


class SearchLogError(RuntimeError):
    """The log cannot be resumed: another search's log, corrupt, or inconsistent."""


@dataclass(frozen=True)
class Flip:
    """One committed flip: ``layer`` (in ``block``) becomes Shared; ``loss``: its candidate loss."""

    block: int
    layer: int
    loss: float


@dataclass(frozen=True)
class Commit:
    """One search step: the flips, the pattern after them, its loss and every candidate's loss."""

    step: int
    flips: tuple[Flip, ...]
    pattern: str
    loss: float
    #: layer -> loss of the pattern with only that layer flipped (the step's candidates).
    candidates: dict[int, float]


@dataclass
class SearchResult:
    pattern: str
    baseline_loss: float
    commits: list[Commit] = field(default_factory=list)
    #: evaluate() calls made by this run (0 when the whole search was replayed from the log).
    evaluations: int = 0
    #: commits read back from an existing log rather than computed by this run.
    resumed_commits: int = 0

    @property
    def losses(self) -> list[float]:
        """All-Full baseline, then the loss after each commit (the curve to plot)."""
        return [self.baseline_loss, *(c.loss for c in self.commits)]


# ---------------------------------------------------------------------- blocks
def block_bounds(num_layers: int, blocks: int) -> list[range]:
    """P contiguous blocks, as even as possible; the first ``num_layers % P`` are one longer."""
    base, extra = divmod(num_layers, blocks)
    out, start = [], 0
    for b in range(blocks):
        stop = start + base + (1 if b < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


def block_quotas(bounds: list[range], target_full: int) -> list[int]:
    """Full layers each block keeps: >= 1, <= its size, summing to ``target_full``."""
    n = sum(len(r) for r in bounds)
    quotas = [1] * len(bounds)
    for _ in range(target_full - len(bounds)):
        open_blocks = [b for b, r in enumerate(bounds) if quotas[b] < len(r)]
        best = max(open_blocks, key=lambda b: (len(bounds[b]) * target_full / n - quotas[b], -b))
        quotas[best] += 1
    return quotas


def check_request(num_layers: int, target_full: int, blocks: int) -> None:
    """Raise :class:`SearchError` naming the fix for an impossible request."""
    if num_layers < 1:
        raise SearchError(f"num_layers={num_layers}: the model needs at least one layer.")
    if not 1 <= target_full <= num_layers:
        raise SearchError(
            f"--target-full {target_full} is outside [1, {num_layers}] (the model has "
            f"{num_layers} layers and layer 0 is always Full). Fix: pick 1..{num_layers}, "
            f"e.g. {max(1, num_layers // 4)} to keep a quarter of the indexers."
        )
    if blocks < 1:
        raise SearchError(f"--blocks {blocks}: use 1 (no pipeline blocks) or more.")
    if blocks > target_full:
        raise SearchError(
            f"--blocks {blocks} > --target-full {target_full}: every block's first layer is "
            f"fixed Full, so {blocks} blocks need at least {blocks} Full layers. Fix: use "
            f"--blocks <= {target_full} or raise --target-full."
        )


def flip(pattern: str, layer: int) -> str:
    """``pattern`` with ``layer`` made Shared."""
    return pattern[:layer] + "S" + pattern[layer + 1 :]


# ---------------------------------------------------------------------- search
def greedy_search(
    num_layers: int,
    target_full: int,
    evaluate: Evaluate,
    blocks: int = 1,
    log_path: str | os.PathLike[str] | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
    on_commit: Callable[[Commit], None] | None = None,
) -> SearchResult:
    """Run (or resume) the greedy search; see the module docstring for the algorithm.

    Args:
        num_layers: trunk layers (MTP layers are not searched; they stay as the model has them).
        target_full: Full layers to keep, in ``[1, num_layers]``.
        evaluate: LM loss of a pattern (``"F"``/``"S"`` per layer) on fixed calibration data;
            must be deterministic for resume to reproduce the uninterrupted search.
        blocks: P >= 1 pipeline blocks (see module docstring); 1 is the paper's plain search.
        log_path: JSON-lines log to append to and to resume from (None: no log).
        meta: JSON-able description of the model and data, stored in the header and required
            to match on resume.
        on_commit: called with each commit this run computes (progress printing).

    Raises:
        SearchError: impossible request. SearchLogError: the log belongs to another search.
    """
    check_request(num_layers, target_full, blocks)
    header = {
        "kind": "header",
        "version": LOG_VERSION,
        "num_layers": num_layers,
        "target_full": target_full,
        "blocks": blocks,
        "meta": dict(meta or {}),
    }
    log = _Log(Path(log_path), header) if log_path is not None else None
    cache = dict(log.evals) if log else {}
    logged_commits = dict(log.commits) if log else {}
    result = SearchResult("F" * num_layers, math.nan)
    step = 0

    def loss_of(pattern: str) -> float:
        if pattern not in cache:
            value = float(evaluate(pattern))
            result.evaluations += 1
            cache[pattern] = value
            if log:
                log.append({"kind": "eval", "step": step, "pattern": pattern, "loss": value})
        return cache[pattern]

    bounds = block_bounds(num_layers, blocks)
    quotas = block_quotas(bounds, target_full)
    result.baseline_loss = loss_of(result.pattern)
    while result.pattern.count("F") > target_full:
        step += 1
        commit = _step(step, result.pattern, bounds, quotas, loss_of)
        logged = logged_commits.get(step)
        if logged is not None:
            if logged["pattern"] != commit.pattern:
                raise SearchLogError(
                    f"{log_path}: step {step} was logged as {logged['pattern']} but replaying "
                    f"the logged losses gives {commit.pattern}. The log is not from this search "
                    "(or was edited). Fix: use a new --out directory."
                )
            result.resumed_commits += 1
        else:
            if log:
                log.append(_commit_record(commit))
            if on_commit:
                on_commit(commit)
        result.commits.append(commit)
        result.pattern = commit.pattern
    return result


def _step(
    step: int,
    pattern: str,
    bounds: list[range],
    quotas: list[int],
    loss_of: Callable[[str], float],
) -> Commit:
    candidates: dict[int, float] = {}
    flips: list[Flip] = []
    for b, rng in enumerate(bounds):
        full = [i for i in rng if pattern[i] == "F"]
        if len(full) <= quotas[b]:
            continue
        losses = {j: loss_of(flip(pattern, j)) for j in full if j != rng.start}
        candidates.update(losses)
        # NaN/inf losses never win; ties go to the lowest layer index.
        best = min(losses, key=lambda j: (_finite_or_inf(losses[j]), j))
        flips.append(Flip(b, best, losses[best]))
    new = pattern
    for f in flips:
        new = flip(new, f.layer)
    loss = flips[0].loss if len(flips) == 1 else loss_of(new)
    return Commit(step, tuple(flips), new, loss, candidates)


def _finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _commit_record(c: Commit) -> dict[str, Any]:
    return {
        "kind": "commit",
        "step": c.step,
        "flips": [{"block": f.block, "layer": f.layer, "loss": f.loss} for f in c.flips],
        "pattern": c.pattern,
        "loss": c.loss,
        "candidates": [[j, v] for j, v in sorted(c.candidates.items())],
    }


# ---------------------------------------------------------------------- log
class _Log:
    """Append-only JSON-lines log; reads (and repairs a torn tail of) an existing one."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.evals: dict[str, float] = {}
        self.commits: dict[int, dict[str, Any]] = {}
        records = self._read() if path.exists() else []
        if records:
            _check_header(path, records[0], header)
            for rec in records[1:]:
                if rec.get("kind") == "eval":
                    self.evals[rec["pattern"]] = float(rec["loss"])
                elif rec.get("kind") == "commit":
                    self.commits[int(rec["step"])] = rec
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
            self.append(header)

    def _read(self) -> list[dict[str, Any]]:
        data = self.path.read_bytes()
        records: list[dict[str, Any]] = []
        good_end = pos = 0
        lines = data.split(b"\n")
        for k, line in enumerate(lines):
            complete = k < len(lines) - 1  # followed by a newline
            try:
                record = json.loads(line) if complete and line.strip() else None
            except json.JSONDecodeError:
                record = None
                if any(rest.strip() for rest in lines[k + 1 :]):
                    raise SearchLogError(
                        f"{self.path}: line {k + 1} is not JSON and is not the last line; the "
                        "log is corrupt. Fix: use a new --out directory."
                    ) from None
            if record is None:
                # Blank, or the torn last record of a crash mid-write: dropped.
                if line.strip():
                    break
            else:
                records.append(record)
            pos += len(line) + 1
            good_end = pos if complete else good_end
        if good_end < len(data):
            # Cut the torn tail so the next append starts on a fresh line.
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
        return records

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _check_header(path: Path, found: dict[str, Any], want: dict[str, Any]) -> None:
    if found.get("kind") != "header":
        raise SearchLogError(f"{path}: first record is not a search header; not a search log.")
    diff = [
        k
        for k in ("version", "num_layers", "target_full", "blocks", "meta")
        if found.get(k) != want[k]
    ]
    if diff:
        detail = ", ".join(f"{k}: log {found.get(k)!r} vs now {want[k]!r}" for k in diff)
        raise SearchLogError(
            f"{path} belongs to another search ({detail}). Fix: rerun with the logged settings "
            "to resume it, or use a new --out directory."
        )
