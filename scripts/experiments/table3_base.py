"""The Table-3 base across device calls (issue #24): fingerprint, completion marker, analysis cache.

One device command may run 600 s, less than the whole protocol; a warm device keeps the work
dir between two calls. So call A trains the base (``--stop-after base``) and call B reuses it
(``--reuse-base``) when it finds, in the work dir:

* ``base.json``: the marker, written (temp + rename) once the base finished or was stopped at
  its deadline *and* left a checkpoint: the fingerprint of what it was trained from, whether it
  completed, and its ledger record (steps, wall time, the trainer's evaluations);
* ``base_analysis.json``: the base's analysis (the search for arm (e), its zero-step
  evaluations), valid for one fingerprint and one checkpoint step.

The fingerprint is a hash of the composed base config (model, recipe with the step counts,
optimizer, seed, the Hydra overrides) and the data's identity (sizes and the ``.idx`` files'
SHA-256), so a different ``--base-steps`` or corpus slice never reuses a base. Pure Python.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from indexcache_train.tools.model_io import write_atomic

MARKER = "base.json"
ANALYSIS = "base_analysis.json"
#: What ``--overwrite --reuse-base`` keeps of a previous work dir (globs under it): the base's
#: run, log, HF export, search and evaluation, and the two files above.
BASE_FILES = (
    MARKER,
    ANALYSIS,
    "runs/base-*",
    "logs/base.log",
    "hf/base",
    "search",
    "eval/base",
    "cache/base",
)


def data_identity(prefixes: tuple[str, ...]) -> dict[str, Any]:
    """Sizes of each prefix's ``.bin`` and SHA-256 of its ``.idx`` (document boundaries):
    stable across copies of the same files, unlike modification times."""
    out: dict[str, Any] = {}
    for prefix in prefixes:
        name = Path(prefix).name
        out[f"{name}.bin_bytes"] = Path(prefix + ".bin").stat().st_size
        out[f"{name}.idx_sha256"] = hashlib.sha256(Path(prefix + ".idx").read_bytes()).hexdigest()
    return out


def fingerprint(inputs: dict[str, Any]) -> str:
    """A short hash of JSON-ready ``inputs`` (key order does not matter)."""
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_step(ckpt: Path) -> int:
    """The step of a trainer checkpoint directory (``step_00000120`` -> 120)."""
    return int(ckpt.name.removeprefix("step_"))


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_marker(work: Path, fp: str, inputs: dict[str, Any], **fields: Any) -> None:
    """The base's marker (atomic): its fingerprint, inputs and ``fields``."""
    doc = {"fingerprint": fp, "inputs": inputs, **fields}
    write_atomic(work / MARKER, (json.dumps(doc, indent=1, default=str) + "\n").encode())


def reusable(work: Path, fp: str, inputs: dict[str, Any]) -> tuple[dict | None, str]:
    """The marker when its fingerprint is ``fp`` (else None) and a sentence saying why."""
    marker = _read(work / MARKER)
    if marker is None:
        return (
            None,
            f"no base marker ({MARKER}) in {work}: the device was cold or the base never finished",
        )
    if marker.get("fingerprint") != fp:
        old = marker.get("inputs") or {}
        changed = sorted(k for k in {*old, *inputs} if old.get(k) != inputs.get(k))
        return None, (
            f"the base in {work} has fingerprint {marker.get('fingerprint')}, this call "
            f"{fp} (differs in: {', '.join(changed) or 'unknown'})"
        )
    state = "complete" if marker.get("complete") else f"stopped at step {marker.get('steps_done')}"
    return marker, f"found the base with fingerprint {fp} ({state})"


def load_analysis(work: Path, fp: str, step: int) -> dict[str, Any]:
    """The cached analysis of the base checkpoint at ``step`` ({} when none matches)."""
    doc = _read(work / ANALYSIS) or {}
    if doc.get("fingerprint") != fp or doc.get("base_step") != step:
        return {}
    return doc.get("results") or {}


def update_analysis(work: Path, fp: str, step: int, **results: Any) -> None:
    """Merge ``results`` into the cache of this fingerprint and step (atomic)."""
    doc = {
        "fingerprint": fp,
        "base_step": step,
        "results": {**load_analysis(work, fp, step), **results},
    }
    write_atomic(work / ANALYSIS, (json.dumps(doc, indent=1, default=str) + "\n").encode())


def kept_paths(work: Path) -> set[Path]:
    """The existing paths of :data:`BASE_FILES` under ``work``."""
    return {p for pattern in BASE_FILES for p in work.glob(pattern)}


def prune(root: Path, keep: set[Path]) -> None:
    """Delete everything under ``root`` except ``keep`` (and the directories holding it)."""
    for path in list(root.iterdir()):
        if path in keep:
            continue
        if path.is_dir() and not path.is_symlink() and any(path in k.parents for k in keep):
            prune(path, keep)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def discard(work: Path) -> None:
    """Delete the base's files (a mismatched or missing base is trained afresh)."""
    for path in kept_paths(work):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
