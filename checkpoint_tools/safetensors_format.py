"""The safetensors file format, read and written without the ``safetensors`` package.

Layout (https://github.com/huggingface/safetensors, "Format"): 8 bytes little-endian header
length ``N``, ``N`` bytes of JSON (``{name: {dtype, shape, data_offsets: [begin, end]}}`` plus an
optional ``__metadata__`` string map; may be right-padded with spaces), then the data buffer.
Offsets are relative to the buffer, must tile it exactly (no holes, no overlap) and the buffer
must end at the end of the file.

We parse headers ourselves because (a) it is the only way to see a shard's tensor list, dtypes and
shapes without mapping its data, and (b) checking the offsets against the file size is how a
truncated download is caught *before* a conversion writes anything. Corruption inside the data
buffer (flipped bits with the right length) is not detectable: the format has no checksums.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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
#: The reference implementation refuses headers above 100 MB; so do we (a garbage length field
#: must not make us allocate gigabytes).
MAX_HEADER_BYTES = 100_000_000
_ALIGN = 8


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: shard file, dtype string, shape and absolute byte range."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def file(self) -> str:
        """Shard file name (what ``weight_map`` holds)."""
        return self.path.name

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorSpec:
    """What a writer needs to lay a tensor out before its data exists."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one shard's header; returns ``(tensors, __metadata__)``.

    Raises:
        CorruptShardError: unreadable or inconsistent header, or a file size that does not match
            the offsets (truncated or padded file).
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise _corrupt(path, f"file is {size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise _corrupt(path, f"header length {header_len} does not fit the {size}-byte file")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {name: _parse_entry(path, name, entry, data_start) for name, entry in header.items()}
    _check_tiling(path, tensors, data_start, size)
    return tensors, metadata


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


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _corrupt(path, "header entry is not an object", name)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise _corrupt(path, f"unknown dtype {dtype!r}", name)
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _corrupt(path, f"invalid shape {shape!r}", name)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise _corrupt(path, f"invalid data_offsets {offsets!r}", name)
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise _corrupt(
            path,
            f"data_offsets span {offsets[1] - offsets[0]} bytes but {dtype}{shape} needs {nbytes}",
            name,
        )
    return TensorInfo(name, path, dtype, tuple(shape), data_start + offsets[0], nbytes)


def _check_tiling(path: Path, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """Offsets must cover the data buffer exactly, the way the reference reader demands."""
    end = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes)):
        if info.offset != end:
            what = (
                "overlaps the previous tensor" if info.offset < end else "leaves a hole before it"
            )
            raise _corrupt(path, f"tensor data {what}", info.name)
        end = info.offset + info.nbytes
    if end != size:
        detail = f"file is {size} bytes but its header describes {end}" + (
            " (truncated: incomplete download or copy?)" if size < end else " (trailing bytes)"
        )
        raise _corrupt(path, detail)


def _corrupt(path: Path, detail: str, tensor: str | None = None) -> CorruptShardError:
    return CorruptShardError(
        f"corrupt safetensors shard: {detail}",
        file=str(path),
        tensor=tensor,
        fix="re-download or re-copy this shard (compare its size and checksum with the source)",
    )
