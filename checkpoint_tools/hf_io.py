"""Streaming read access to Hugging Face safetensors checkpoints, plus the writer's public API.

:class:`HFCheckpoint` lists every tensor (name, shard, dtype, shape) from the shard headers alone,
validating headers, offsets, file sizes and the index up front (so a truncated download fails
before a conversion writes anything), and reads single tensors, or one tensor-parallel slice of
one (``read_slice``, for ``import`` at TP > 1), with plain positioned reads: no mmap, whose
touched pages would count as resident memory until unmapped. Nothing here holds
more than one tensor, so a 1.5 TB GLM-5 checkpoint converts on a login node.

The writer lives in :mod:`checkpoint_tools.shard_writer`; its public names are re-exported here
so the verbs import all checkpoint I/O from one place.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from checkpoint_tools.errors import (
    CheckpointError,
    ConfigError,
    CorruptShardError,
    MissingTensorError,
)
from checkpoint_tools.safetensors_format import (
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_FILE_NAME,
    TensorInfo,
    read_header,
    torch_dtype,
)
from checkpoint_tools.shard_writer import (
    ShardedCheckpointWriter,
    check_output_dir,
    copy_side_files,
    make_tmp_dir,
    move_into_place,
    parse_size,
    plan_shards,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "SINGLE_FILE_NAME",
    "HFCheckpoint",
    "ShardedCheckpointWriter",
    "TensorInfo",
    "check_output_dir",
    "copy_side_files",
    "load_config",
    "make_tmp_dir",
    "move_into_place",
    "parse_size",
    "plan_shards",
]


def load_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory as a plain dict."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(
            "no config.json", file=str(path), fix="point --hf at a Hugging Face model directory"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config.json is unreadable ({exc})", file=str(path)) from exc
    if not isinstance(config, dict):
        raise ConfigError("config.json is not a JSON object", file=str(path))
    return config


class HFCheckpoint:
    """Read-only view of an HF checkpoint directory; headers are parsed and checked on open.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` or an index plus shards.

    Raises:
        ConfigError: missing or unreadable config.json.
        CorruptShardError: missing shard, unreadable or inconsistent header, truncated shard,
            or an index that disagrees with the shards.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a directory", file=str(self.path))
        self.config = load_config(self.path)
        self.index_file: Path | None = None
        self._tensors = self._load_tensors()

    # ------------------------------------------------------------------ listing
    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def names(self) -> list[str]:
        """Tensor names in storage order (shard, then offset)."""
        return list(self._tensors)

    def infos(self) -> list[TensorInfo]:
        """Every tensor's location, dtype and shape, in storage order; reads no data."""
        return list(self._tensors.values())

    def info(self, name: str) -> TensorInfo:
        """One tensor's location, dtype and shape."""
        try:
            return self._tensors[name]
        except KeyError:
            raise MissingTensorError(
                "tensor not in checkpoint", file=str(self.path), tensor=name
            ) from None

    @property
    def shard_files(self) -> list[Path]:
        return sorted({info.path for info in self._tensors.values()})

    @property
    def total_size(self) -> int:
        """Sum of tensor bytes (what ``metadata.total_size`` holds)."""
        return sum(info.nbytes for info in self._tensors.values())

    # ------------------------------------------------------------------ reading
    def read_tensor(self, name: str) -> torch.Tensor:
        """Load one tensor into a fresh CPU tensor (no mmap; the only copy is the result)."""
        info = self.info(name)
        with info.path.open("rb", buffering=0) as f:
            return _read_info(f, info)

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Load ``tensor[..., start:stop, ...]`` (``dim``) without reading the rest of the tensor.

        The tensor is viewed as ``[outer, size(dim), inner]``; each outer row contributes one
        contiguous byte range, read with a positioned read straight into the result (a TP shard of
        an embedding reads one range; of a row-parallel weight, one range per row).
        """
        info = self.info(name)
        if not 0 <= dim < len(info.shape) or not 0 <= start <= stop <= info.shape[dim]:
            raise ValueError(
                f"slice [{start}:{stop}] on dim {dim} is outside {name} of shape {list(info.shape)}"
            )
        outer, inner = math.prod(info.shape[:dim]), math.prod(info.shape[dim + 1 :])
        esize = info.nbytes // max(info.numel, 1)
        row_bytes, span = info.shape[dim] * inner * esize, (stop - start) * inner * esize
        buf = bytearray(outer * span)
        view = memoryview(buf)
        with info.path.open("rb", buffering=0) as f:
            for row in range(outer):
                offset = info.offset + row * row_bytes + start * inner * esize
                _read_exact(f, view[row * span : (row + 1) * span], offset, info)
        shape = (*info.shape[:dim], stop - start, *info.shape[dim + 1 :])
        return _decode(buf, info.dtype, shape)

    def iter_tensors(
        self, names: Sequence[str] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` one at a time, opening each shard once (storage order)."""
        wanted = self.infos() if names is None else [self.info(n) for n in names]
        wanted.sort(key=lambda i: (str(i.path), i.offset))
        current: Path | None = None
        f = None
        try:
            for info in wanted:
                if info.path != current:
                    if f is not None:
                        f.close()
                    f, current = info.path.open("rb", buffering=0), info.path
                yield info.name, _read_info(f, info)
        finally:
            if f is not None:
                f.close()

    # ------------------------------------------------------------------ loading
    def _load_tensors(self) -> dict[str, TensorInfo]:
        single, index = self.path / SINGLE_FILE_NAME, self.path / INDEX_NAME
        # Same precedence as transformers: a single model.safetensors wins over an index.
        if single.is_file():
            tensors, _ = read_header(single)
            return tensors
        if not index.is_file():
            raise CorruptShardError(
                f"no {SINGLE_FILE_NAME} and no {INDEX_NAME}",
                file=str(self.path),
                fix="point at a directory saved with safetensors (save_pretrained(safe_serialization=True))",
            )
        self.index_file = index
        weight_map = _read_weight_map(index)
        tensors: dict[str, TensorInfo] = {}
        for shard_name in sorted(set(weight_map.values())):
            shard = self.path / shard_name
            if not shard.is_file():
                raise CorruptShardError(
                    f"index names shard {shard_name}, which does not exist",
                    file=str(index),
                    fix="re-download the missing shard",
                )
            shard_tensors, _ = read_header(shard)
            for name, info in shard_tensors.items():
                if weight_map.get(name) != shard_name:
                    raise CorruptShardError(
                        f"shard {shard_name} holds a tensor the index maps to "
                        f"{weight_map.get(name)!r}",
                        file=str(index),
                        tensor=name,
                        fix="regenerate the index from the shards, or re-download both",
                    )
                tensors[name] = info
        for name, shard_name in weight_map.items():
            if name not in tensors:
                raise CorruptShardError(
                    f"index maps the tensor to {shard_name}, but that shard does not contain it",
                    file=str(index),
                    tensor=name,
                    fix="re-download the shard (or the matching index)",
                )
        return tensors


# ---------------------------------------------------------------------- helpers
def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CorruptShardError(
            f"unreadable index ({exc!r})", file=str(index), fix="re-download the index file"
        ) from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptShardError("weight_map is not a name -> file map", file=str(index))
    return weight_map


def _read_info(f: Any, info: TensorInfo) -> torch.Tensor:
    buf = bytearray(info.nbytes)
    _read_exact(f, memoryview(buf), info.offset, info)
    return _decode(buf, info.dtype, info.shape)


def _read_exact(f: Any, view: memoryview, offset: int, info: TensorInfo) -> None:
    """Fill ``view`` from byte ``offset`` of the open shard ``f``."""
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise CorruptShardError(
                "shard ended inside a tensor", file=str(info.path), tensor=info.name
            )
        done += n


def _decode(buf: bytearray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    if not buf:
        return torch.empty(shape, dtype=torch_dtype(dtype))
    # Decode through uint8 so every dtype (FP8 included) takes the same path.
    return torch.frombuffer(buf, dtype=torch.uint8).view(torch_dtype(dtype)).reshape(shape)
