"""Block-scaled FP8 checkpoints (DeepSeek-V3 / V3.2, GLM-5-FP8) and their dequantisation.

Format (DeepSeek-V3 ``inference/fp8_cast_bf16.py``, transformers' ``finegrained_fp8``): a linear
weight ``W[out, in]`` is stored as ``<name>.weight`` in ``float8_e4m3fn`` plus
``<name>.weight_scale_inv`` in fp32 of shape ``[ceil(out / 128), ceil(in / 128)]``; block
``(i, j)`` covers rows ``128 i .. 128 i + 127`` and columns ``128 j .. 128 j + 127`` (edge
blocks are partial) and dequantises as ``W = W_fp8 * scale_inv[i, j]``. The block size comes
from ``quantization_config.weight_block_size`` when the config has one.

Tensors we do not change are copied byte for byte, FP8 and scale alike; dequantisation is for
consumers that need real values (import into Megatron, parity checks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from checkpoint_tools.errors import CheckpointIssue, Fp8ScaleMissingError, UnexpectedTensorError

if TYPE_CHECKING:
    import torch

    from checkpoint_tools.hf_io import HFCheckpoint
    from checkpoint_tools.safetensors_format import TensorInfo

#: safetensors dtype strings of block-scaled FP8 weights.
FP8_DTYPES = frozenset({"F8_E4M3"})
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK_SIZE = (128, 128)
#: Dtypes a ``weight_scale_inv`` may be stored in.
SCALE_DTYPES = frozenset({"F32", "BF16", "F16"})


def is_fp8(dtype: str) -> bool:
    """True for a safetensors dtype string that needs a block scale."""
    return dtype in FP8_DTYPES


def scale_name(weight_name: str) -> str:
    """``a.b.weight`` -> ``a.b.weight_scale_inv``."""
    return weight_name + SCALE_SUFFIX


def is_scale_name(name: str) -> bool:
    return name.endswith(".weight" + SCALE_SUFFIX)


def weight_name_of_scale(scale: str) -> str:
    """Inverse of :func:`scale_name`."""
    return scale[: -len(SCALE_SUFFIX)]


def block_size_from_config(config: Mapping[str, Any]) -> tuple[int, int]:
    """``quantization_config.weight_block_size`` or the 128 x 128 every released model uses."""
    block = (config.get("quantization_config") or {}).get("weight_block_size")
    if block is None:
        return DEFAULT_BLOCK_SIZE
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(
            f"quantization_config.weight_block_size must be two positive ints, got {block}"
        )
    return int(block[0]), int(block[1])


def expected_scale_shape(weight_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """``[ceil(out / block_out), ceil(in / block_in)]`` for a 2-D weight."""
    if len(weight_shape) != 2:
        raise ValueError(f"block-scaled FP8 needs a 2-D weight, got shape {list(weight_shape)}")
    return math.ceil(weight_shape[0] / block[0]), math.ceil(weight_shape[1] / block[1])


def dequantize_blockwise(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``weight * scale_inv`` per block, computed in fp32, returned in ``dtype`` (bf16 default).

    Args:
        weight: ``[out, in]`` FP8 tensor.
        scale_inv: ``[ceil(out / b0), ceil(in / b1)]`` scales; edge blocks may be partial.
        block: ``(b0, b1)`` block size.
        dtype: result dtype; ``torch.bfloat16`` when None.
    """
    import torch

    dtype = torch.bfloat16 if dtype is None else dtype
    expected = expected_scale_shape(tuple(weight.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv shape {list(scale_inv.shape)} does not match weight {list(weight.shape)} "
            f"with {block[0]}x{block[1]} blocks (expected {list(expected)})"
        )
    out_dim, in_dim = weight.shape
    # Expand each scale over its block, then crop the partial edge blocks.
    scale = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return (weight.float() * scale[:out_dim, :in_dim]).to(dtype)


def read_dequantized(
    ckpt: HFCheckpoint, name: str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Read a tensor; FP8 weights are dequantised with their scale, others returned as stored.

    Raises:
        Fp8ScaleMissingError: ``name`` is FP8 but ``<name>_scale_inv`` is absent (names the shard).
    """
    info = ckpt.info(name)
    if not is_fp8(info.dtype):
        return ckpt.read_tensor(name)
    scale = scale_name(name)
    if scale not in ckpt:
        raise Fp8ScaleMissingError(
            f"FP8 ({info.dtype}) weight without its {scale}",
            file=str(info.path),
            tensor=name,
            fix="use the complete FP8 checkpoint (every FP8 weight has a weight_scale_inv), "
            "or the BF16 release",
        )
    block = block_size_from_config(ckpt.config)
    return dequantize_blockwise(ckpt.read_tensor(name), ckpt.read_tensor(scale), block, dtype)


def read_dequantized_slice(
    ckpt: HFCheckpoint,
    name: str,
    dim: int,
    start: int,
    stop: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``read_dequantized(ckpt, name)`` narrowed to ``[start:stop]`` on ``dim``, reading only
    the rows / columns needed (a tensor-parallel shard).

    FP8 weights are read block-aligned with the matching rows / columns of their scale (a block
    is dequantised by its own scale only, so the aligned piece dequantises exactly as the whole
    tensor would), then cropped to the requested range.
    """
    info = ckpt.info(name)
    if not is_fp8(info.dtype):
        return ckpt.read_slice(name, dim, start, stop)
    scale = scale_name(name)
    if scale not in ckpt:
        read_dequantized(ckpt, name)  # raises Fp8ScaleMissingError with the shard's name
    block = block_size_from_config(ckpt.config)
    size = block[dim]
    first, last = start // size, math.ceil(stop / size)
    lo, hi = first * size, min(last * size, info.shape[dim])
    piece = dequantize_blockwise(
        ckpt.read_slice(name, dim, lo, hi),
        ckpt.read_slice(scale, dim, first, last),
        block,
        dtype,
    )
    return piece.narrow(dim, start - lo, stop - start)


def fp8_issues(tensors: Mapping[str, TensorInfo], block: tuple[int, int]) -> list[CheckpointIssue]:
    """Every FP8 weight without a scale of the right shape, and every scale without an FP8 weight."""
    issues = []
    for name, info in tensors.items():
        if is_fp8(info.dtype):
            scale = tensors.get(scale_name(name))
            if scale is None:
                issues.append(
                    CheckpointIssue(
                        Fp8ScaleMissingError,
                        f"FP8 ({info.dtype}) weight without its {scale_name(name)}",
                        info.file,
                        name,
                        "use the complete FP8 checkpoint or the BF16 release",
                    )
                )
            elif len(info.shape) != 2 or scale.shape != expected_scale_shape(info.shape, block):
                issues.append(
                    CheckpointIssue(
                        Fp8ScaleMissingError,
                        f"scale shape {list(scale.shape)} does not fit weight {list(info.shape)} "
                        f"with {block[0]}x{block[1]} blocks",
                        scale.file,
                        scale.name,
                        "check quantization_config.weight_block_size",
                    )
                )
            elif scale.dtype not in SCALE_DTYPES:
                issues.append(
                    CheckpointIssue(
                        Fp8ScaleMissingError,
                        f"scale stored as {scale.dtype}, expected one of {sorted(SCALE_DTYPES)}",
                        scale.file,
                        scale.name,
                    )
                )
        elif is_scale_name(name):
            weight = tensors.get(weight_name_of_scale(name))
            if weight is None or not is_fp8(weight.dtype):
                issues.append(
                    CheckpointIssue(
                        UnexpectedTensorError,
                        "weight_scale_inv without an FP8 weight beside it",
                        info.file,
                        name,
                        "drop the stray scale, or restore the FP8 weight it belongs to",
                    )
                )
    return issues
