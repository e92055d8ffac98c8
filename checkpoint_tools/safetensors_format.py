"""safetensors shards through the ``safetensors`` library, with errors that name file and fix.

Reading goes through ``safetensors.safe_open``: it validates the header (JSON, dtypes, offsets that
tile the data buffer exactly, buffer ending at the end of the file) when a shard is opened, so a
truncated download fails before a conversion writes anything; :func:`open_shard` turns its errors
into :class:`CorruptShardError` with a diagnosis. Every read opens the shard for that read only
(``safe_open`` maps the file; closing it unmaps the pages the read touched), so memory stays at
one tensor, or one chunk of one (:func:`iter_row_chunks`), whatever the shard size. Corruption
inside the data buffer (flipped bits with the right length) is not detectable: the format has
no checksums.

The writer side (:func:`build_header`) stays ours: ``safetensors.torch.save_file`` needs every
tensor of a file in memory at once, which a streaming conversion of a 1.5 TB checkpoint cannot
give it (:mod:`checkpoint_tools.shard_writer`).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from checkpoint_tools.errors import CorruptShardError

if TYPE_CHECKING:
    import torch

#: File names of HF's (sharded) safetensors layout.
CONFIG_NAME = "config.json"
SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
#: Bytes per element for every dtype string safetensors defines.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F8_E8M0", "F16", "BF16", "F32", "F64"})
_ALIGN = 8


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: shard file, dtype string and shape."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def file(self) -> str:
        """Shard file name (what ``weight_map`` holds)."""
        return self.path.name

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class TensorSpec:
    """What a writer needs to lay a tensor out before its data exists."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@contextmanager
def open_shard(path: Path) -> Iterator[Any]:
    """``safe_open`` (PyTorch tensors) as a context manager; errors become :class:`CorruptShardError`."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as exc:
        raise _corrupt(path, _diagnose(path, str(exc)), _tensor_named(str(exc))) from None
    except OSError as exc:
        raise _corrupt(path, f"unreadable ({exc})") from None
    with handle as f:
        yield f


def read_shard_infos(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of one shard, in storage order (headers only)."""
    infos: dict[str, TensorInfo] = {}
    with open_shard(path) as f:
        for name in f.offset_keys():
            part = f.get_slice(name)
            dtype = part.get_dtype()
            if dtype not in DTYPE_SIZES:
                raise _corrupt(path, f"dtype {dtype} is not supported by these tools", name)
            infos[name] = TensorInfo(name, path, dtype, tuple(part.get_shape()))
    return infos


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One whole tensor (a fresh CPU copy)."""
    with open_shard(info.path) as f:
        return f.get_tensor(info.name)


def read_slice(info: TensorInfo, dim: int, start: int, stop: int) -> torch.Tensor:
    """``tensor[..., start:stop, ...]`` along ``dim``, reading only those bytes."""
    with open_shard(info.path) as f:
        return f.get_slice(info.name)[(slice(None),) * dim + (slice(start, stop),)]


def iter_row_chunks(info: TensorInfo, max_bytes: int) -> Iterator[torch.Tensor]:
    """The tensor as consecutive dim-0 slices of at most ``max_bytes`` (one row at least)."""
    if not info.shape or info.shape[0] == 0 or info.nbytes <= max_bytes:
        yield read_tensor(info)
        return
    rows = info.shape[0]
    step = max(1, max_bytes // max(info.nbytes // rows, 1))
    for start in range(0, rows, step):
        yield read_slice(info, 0, start, min(start + step, rows))


def build_header(specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """Header bytes (length prefix included) for tensors stored back to back in ``specs`` order."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad with spaces so the data buffer starts 8-byte aligned, as the reference writer does.
    body += b" " * (-(8 + len(body)) % _ALIGN)
    return struct.pack("<Q", len(body)) + body


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype string."""
    import torch

    table = {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "I32": torch.int32,
        "I64": torch.int64,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F32": torch.float32,
        "F64": torch.float64,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
        "U16": getattr(torch, "uint16", None),
        "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None),
        "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
    }
    result = table.get(dtype)
    if result is None:
        raise TypeError(f"safetensors dtype {dtype!r} has no torch equivalent in this torch build")
    return result


def dtype_string(dtype: torch.dtype) -> str:
    """The safetensors dtype string for a torch dtype."""
    for name in DTYPE_SIZES:
        try:
            if torch_dtype(name) == dtype:
                return name
        except TypeError:
            continue
    raise TypeError(f"torch dtype {dtype} has no safetensors equivalent")


def _tensor_named(message: str) -> str | None:
    match = re.search(r"tensor `([^`]+)`", message)
    return match.group(1) if match else None


def _diagnose(path: Path, message: str) -> str:
    """A plain-words reading of a safetensors header error."""
    message = message.removeprefix("Error while deserializing header: ")
    if "invalid offset" in message:
        return (
            f"{message}: its data_offsets leave a hole, overlap another tensor or do not match "
            "its dtype x shape"
        )
    if "not fully covered" in message:
        try:
            return _coverage(path)
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            pass
    return message


def _coverage(path: Path) -> str:
    """File size against the end of the data its header describes."""
    size = path.stat().st_size
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    ends = [e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"]
    end = 8 + header_len + max(ends, default=0)
    return f"file is {size} bytes but its header describes {end}" + (
        " (truncated: incomplete download or copy?)" if size < end else " (trailing bytes)"
    )


def _corrupt(path: Path, detail: str, tensor: str | None = None) -> CorruptShardError:
    return CorruptShardError(
        f"corrupt safetensors shard: {detail}",
        file=str(path),
        tensor=tensor,
        fix="re-download or re-copy this shard (compare its size and checksum with the source)",
    )
