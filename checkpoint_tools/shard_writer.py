"""Write an HF safetensors checkpoint tensor by tensor, atomically at directory level.

Why not ``safetensors.torch.save_file`` / ``save_pretrained``: they take every tensor of a file in
memory at once and write one directory without a commit step, while a conversion of a 1.5 TB
checkpoint must hold one tensor (or one copy chunk) at a time and must never leave a half-written
output. The header format is the library's (``build_header``); the files are read back with it.

:class:`ShardedCheckpointWriter` lays all shards out from a list of :class:`TensorSpec` first
(``save_pretrained``'s greedy ``max_shard_size`` rule: a shard closes when the next tensor would
overflow it; a larger tensor gets its own), writes every header, then accepts tensors one at a
time in any order at their precomputed offsets: one pass over the data, no rewrite, one tensor
or one copy chunk in memory. It works in a temporary directory beside the target and renames it
into place only when everything is written (and, optionally, validated), so a failure never
leaves a half-written checkpoint; an existing target is refused unless ``overwrite``.

Layout follows ``save_pretrained``: one shard -> ``model.safetensors``; several ->
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` with
``metadata.total_size`` (sum of tensor bytes) and a sorted ``weight_map``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from checkpoint_tools.errors import (
    CorruptShardError,
    DtypeMismatchError,
    MissingTensorError,
    OutputExistsError,
    ShapeMismatchError,
    UnexpectedTensorError,
)
from checkpoint_tools.progress import NullProgress, Progress, make_progress
from checkpoint_tools.safetensors_format import (
    INDEX_NAME,
    SINGLE_FILE_NAME,
    TensorInfo,
    TensorSpec,
    build_header,
    dtype_string,
    iter_row_chunks,
)

if TYPE_CHECKING:
    import torch

_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt)$|.*\.index\.json$")
#: Chunk for raw tensor copies: large enough for full disk throughput, small next to RSS budgets.
COPY_CHUNK_BYTES = 16 * 1024 * 1024
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from ``5000000``, ``"5GB"`` (decimal, as in ``save_pretrained``) or ``"512MiB"``."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", size)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB or 512MiB")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


class ShardedCheckpointWriter:
    """Write an HF checkpoint directory tensor by tensor; atomic at directory level.

    Use as a context manager; the output appears only if the block finishes::

        with ShardedCheckpointWriter(out, specs, max_shard_size="5GB") as w:
            w.write_json("config.json", config)
            for name, tensor in produce():
                w.write_tensor(name, tensor)

    Args:
        out_dir: final directory; created by renaming a temporary sibling into place.
        specs: every tensor the checkpoint will hold, in storage order.
        max_shard_size: bytes or a string like ``"5GB"``; a larger tensor gets its own shard.
        overwrite: replace an existing ``out_dir`` (only after the new one is complete).
        progress: show a byte-count bar on stderr.
        fsync: flush files and directories to disk before the rename.
        before_commit: called with the temporary directory after everything is written and
            before the rename (e.g. to validate the result); raising aborts the write.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is False (checked at construction).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        specs: Sequence[TensorSpec],
        *,
        max_shard_size: int | str = "5GB",
        overwrite: bool = False,
        progress: bool = False,
        fsync: bool = True,
        before_commit: Callable[[Path], None] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        check_output_dir(self.out_dir, overwrite)
        self.overwrite, self.fsync, self.before_commit = overwrite, fsync, before_commit
        self._shards = plan_shards(specs, parse_size(max_shard_size))
        self._names = shard_file_names(len(self._shards))
        header_sizes = [len(build_header(shard)) for shard in self._shards]
        self._where: dict[str, tuple[int, int, TensorSpec]] = {}
        for idx, shard in enumerate(self._shards):
            offset = header_sizes[idx]
            for spec in shard:
                if spec.name in self._where:
                    raise ValueError(f"tensor {spec.name} listed twice")
                self._where[spec.name] = (idx, offset, spec)
                offset += spec.nbytes
        self._written: set[str] = set()
        self._fds: dict[int, int] = {}
        self._total_bytes = sum(s.nbytes for s in specs)
        self._show_progress = progress
        self._progress: Progress = NullProgress()
        self.tmp_dir: Path | None = None

    # ------------------------------------------------------------------ context
    def __enter__(self) -> ShardedCheckpointWriter:
        self.tmp_dir = make_tmp_dir(self.out_dir)
        self._progress = make_progress(
            self._total_bytes, f"writing {self.out_dir.name}", self._show_progress
        )
        for idx, shard in enumerate(self._shards):
            header = build_header(shard)
            with (self.tmp_dir / self._names[idx]).open("wb") as f:
                f.write(header)
                # Pre-size the file (sparse) so tensors can land at their offsets in any order.
                f.truncate(len(header) + sum(s.nbytes for s in shard))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            try:
                self._commit()
            except BaseException:
                self._abort()
                raise
        else:
            self._abort()

    # ------------------------------------------------------------------ writing
    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor; its dtype and shape must match its spec exactly."""
        shard, offset, spec = self._claim(name)
        _check_spec(spec, dtype_string(tensor.dtype), tuple(tensor.shape))
        if spec.nbytes:
            _pwrite_all(self._fd(shard), _raw_bytes(tensor), offset)
        self._progress.update(spec.nbytes)

    def copy_tensor(self, name: str, source: TensorInfo) -> None:
        """Copy a tensor from a source shard in chunks of rows (never all of a large tensor in
        memory; the values are moved, not converted, so the copy is bit-identical)."""
        shard, offset, spec = self._claim(name)
        _check_spec(spec, source.dtype, source.shape)
        done = 0
        for chunk in iter_row_chunks(source, COPY_CHUNK_BYTES):
            data = _raw_bytes(chunk)
            _pwrite_all(self._fd(shard), data, offset + done)
            done += len(data)
            self._progress.update(len(data))
        if done != spec.nbytes:
            raise CorruptShardError(
                f"read {done} bytes, the tensor has {spec.nbytes}",
                file=str(source.path),
                tensor=source.name,
            )

    def write_json(self, filename: str, obj: object) -> None:
        """Write a JSON side file (config.json, generation_config.json, ...)."""
        (self._tmp() / filename).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def copy_file(self, source: Path, filename: str | None = None) -> None:
        """Copy a side file (tokenizer, generation config, ...) into the checkpoint."""
        shutil.copy2(source, self._tmp() / (filename or source.name))

    # ------------------------------------------------------------------ internals
    def _tmp(self) -> Path:
        if self.tmp_dir is None:
            raise RuntimeError("use ShardedCheckpointWriter as a context manager")
        return self.tmp_dir

    def _claim(self, name: str) -> tuple[int, int, TensorSpec]:
        self._tmp()
        if name not in self._where:
            raise UnexpectedTensorError("tensor was not in the writer's plan", tensor=name)
        if name in self._written:
            raise ValueError(f"tensor {name} written twice")
        self._written.add(name)
        return self._where[name]

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:
            # Writes arrive mostly shard by shard; keep few descriptors open.
            if len(self._fds) >= 4:
                self._close_fd(next(iter(self._fds)))
            self._fds[shard] = os.open(self._tmp() / self._names[shard], os.O_WRONLY)
        return self._fds[shard]

    def _close_fd(self, shard: int) -> None:
        fd = self._fds.pop(shard)
        try:
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _commit(self) -> None:
        tmp = self._tmp()
        for shard in list(self._fds):
            self._close_fd(shard)
        self._progress.close()
        missing = [name for name in self._where if name not in self._written]
        if missing:
            raise MissingTensorError(
                f"{len(missing)} planned tensor(s) were never written (first: {missing[0]})",
                file=str(self.out_dir),
                tensor=missing[0],
            )
        if len(self._shards) > 1:
            weight_map = {
                spec.name: self._names[idx]
                for idx, shard in enumerate(self._shards)
                for spec in shard
            }
            total = sum(spec.nbytes for shard in self._shards for spec in shard)
            index = {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if self.fsync:
            _fsync_tree(tmp)
        if self.before_commit is not None:
            self.before_commit(tmp)
        move_into_place(tmp, self.out_dir, self.overwrite)
        self.tmp_dir = None

    def _abort(self) -> None:
        for shard in list(self._fds):
            try:
                os.close(self._fds.pop(shard))
            except OSError:
                pass
        self._progress.close()
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir = None


# ---------------------------------------------------------------------- helpers
def plan_shards(specs: Sequence[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in order: start a new shard when the next tensor would overflow this one."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    """``save_pretrained``'s file names for ``count`` shards."""
    if count == 1:
        return [SINGLE_FILE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def make_tmp_dir(out_dir: Path) -> Path:
    """A fresh temporary sibling of ``out_dir`` (renamed into place when complete).

    Made with a plain ``mkdir``, so its mode is 0777 less the umask: the output is a checkpoint
    other users serve, and ``tempfile.mkdtemp``'s 0700 would survive the rename.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; call before any work starts."""
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(
            "output already exists",
            file=str(out_dir),
            fix="choose a new --out, or pass --overwrite to replace it once the new one is complete",
        )


def copy_side_files(
    src_dir: Path, writer: ShardedCheckpointWriter, skip: Sequence[str] = ()
) -> list[str]:
    """Copy tokenizer / generation / chat-template files: every top-level, non-hidden regular
    file that is not a weight file or in ``skip``. Returns the copied names."""
    copied = []
    for path in sorted(src_dir.iterdir()):
        if (
            path.is_file()
            and not path.name.startswith(".")
            and not _WEIGHT_FILE.fullmatch(path.name)
            and path.name not in skip
        ):
            writer.copy_file(path)
            copied.append(path.name)
    return copied


def _check_spec(spec: TensorSpec, dtype: str, shape: tuple[int, ...]) -> None:
    if dtype != spec.dtype:
        raise DtypeMismatchError(f"got {dtype}, the plan says {spec.dtype}", tensor=spec.name)
    if tuple(shape) != spec.shape:
        raise ShapeMismatchError(
            f"got shape {list(shape)}, the plan says {list(spec.shape)}", tensor=spec.name
        )


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in storage order (any dtype, FP8 included)."""
    import torch

    return memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out_dir``; an existing ``out_dir`` (only with
    ``overwrite``) is moved aside first and put back if the rename fails."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    check_output_dir(out_dir, overwrite)  # it may have appeared while we were writing
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rmdir(old)
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.rename(old, out_dir)  # put the previous checkpoint back
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
