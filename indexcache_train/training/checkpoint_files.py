"""Checkpoint directories on disk: durable writes, a size manifest, completeness, stale temporaries.

Pure filesystem code (no torch). A checkpoint is written into ``step_X.tmp`` and renamed into
place; before the rename every small file is fsynced (Megatron fsyncs its ``.distcp`` shards
itself, not ``metadata.json``), then ``manifest.json`` records the size of every file. A
directory whose files do not match its manifest (a copy cut short, a file truncated by a full
disk or a crash of the storage) is *incomplete*: auto-resume skips it, with a warning, for the
newest complete one. Checkpoints from before the manifest count as complete when their
``trainer_state.json`` reads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"
#: The resolved config a checkpoint was trained with (resume compares it with the new one).
RUN_CONFIG_FILE = "run_config.yaml"
MANIFEST = "manifest.json"
LATEST = "latest"
TMP_SUFFIX = ".tmp"
_STEP_DIR = re.compile(r"^step_\d{8}$")
#: Written and fsynced by Megatron's writer (``use_fsync=True``); fsyncing them again from
#: rank 0 would cost one storage round trip per shard of every rank.
_SELF_SYNCED = ".distcp"


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to stable storage."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename, fsync of the directory)."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _sizes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(d.iterdir()) if p.is_file()}


def seal(tmp: Path, final: Path, files: dict[str, str]) -> None:
    """Finish a checkpoint written into ``tmp`` and rename it to ``final`` (rank 0 only).

    Writes ``files`` (name -> text), fsyncs every file Megatron did not, records the manifest
    last, fsyncs the directory, replaces ``final`` and fsyncs the parent, so a crash at any
    point leaves either the old state or a complete new checkpoint.
    """
    for name, text in files.items():
        (tmp / name).write_text(text)
    for p in tmp.iterdir():
        if p.is_file() and not p.name.endswith(_SELF_SYNCED):
            fsync_path(p)
    sizes = _sizes(tmp)
    with open(tmp / MANIFEST, "w") as f:
        json.dump({"files": sizes}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(final.parent)


def incomplete_reason(d: Path) -> str | None:
    """Why ``d`` cannot be resumed from (None: it is complete)."""
    try:
        json.loads((d / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} unreadable ({type(e).__name__})"
    if not (d / MANIFEST).is_file():
        return None  # written before manifests existed
    try:
        want = json.loads((d / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    have = _sizes(d)
    for name, size in sorted(want.items()):
        if name not in have:
            return f"{name} is missing"
        if have[name] != size:
            return f"{name} has {have[name]} bytes, {size} were written"
    return None


def step_dirs(root: Path) -> list[Path]:
    """``step_XXXXXXXX`` directories under ``root``, oldest first (temporaries excluded)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def newest_complete(root: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under ``root`` and one warning per newer incomplete one.

    The ``latest`` pointer names the checkpoint written last; a higher step (a pointer update
    lost in a crash) or, when the pointed-to checkpoint is incomplete, the next older complete
    one is used instead. Every rank reaches the same answer from the same files.
    """
    skipped: list[str] = []
    for d in reversed(step_dirs(root)):
        reason = incomplete_reason(d)
        if reason is None:
            return d, skipped
        skipped.append(f"checkpoint {d} is incomplete ({reason}); not resuming from it")
    return None, skipped


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete ``*.tmp`` files and directories a crashed save left under ``root`` (rank 0, at
    start-up, before this job saves anything); returns what was removed."""
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        if p.name.endswith(TMP_SUFFIX):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p)
    return removed
