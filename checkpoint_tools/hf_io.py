"""Streaming read access to Hugging Face safetensors checkpoints, plus the writer's public API.

:class:`HFCheckpoint` lists every tensor (name, shard, dtype, shape) from the shard headers alone,
checking every shard (``safetensors.safe_open``) and the index up front, so a truncated download
fails before a conversion writes anything, and reads single tensors, or one tensor-parallel slice
of one (``read_slice``, for ``import`` at TP > 1), through ``safe_open`` / ``get_slice``
(:mod:`checkpoint_tools.safetensors_format`). Nothing here holds more than one tensor, so a
1.5 TB GLM-5 checkpoint converts on a login node.

The writer lives in :mod:`checkpoint_tools.shard_writer`; its public names are re-exported here
so the verbs import all checkpoint I/O from one place.
"""

from __future__ import annotations

import json
import os
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
    read_shard_infos,
    read_slice,
    read_tensor,
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
        """Load one tensor into a fresh CPU tensor."""
        return read_tensor(self.info(name))

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Load ``tensor[..., start:stop, ...]`` (``dim``) without reading the rest of the tensor."""
        info = self.info(name)
        if not 0 <= dim < len(info.shape) or not 0 <= start <= stop <= info.shape[dim]:
            raise ValueError(
                f"slice [{start}:{stop}] on dim {dim} is outside {name} of shape {list(info.shape)}"
            )
        return read_slice(info, dim, start, stop)

    # ------------------------------------------------------------------ loading
    def _load_tensors(self) -> dict[str, TensorInfo]:
        single, index = self.path / SINGLE_FILE_NAME, self.path / INDEX_NAME
        # Same precedence as transformers: a single model.safetensors wins over an index.
        if single.is_file():
            return read_shard_infos(single)
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
            shard_tensors = read_shard_infos(shard)
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
