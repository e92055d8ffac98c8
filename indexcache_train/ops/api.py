"""Backend dispatch for the attention / indexer operators.

``backend="auto"`` picks the fused GPU kernel when the inputs are on CUDA and a kernel exists for
the case, and the PyTorch reference otherwise; ``"torch"`` forces the reference (CPU, tests,
debugging) and ``"triton"`` insists on the kernel (errors if it cannot run). The model reads the
choice from its config (``model.kernel_backend``), never from a global.
"""

from __future__ import annotations

from typing import Literal

import torch

from indexcache_train.ops import flop_counter, kernel_dims
from indexcache_train.ops.dense_attention_reference import dense_attention_reference
from indexcache_train.ops.indexer_reference import indexer_topk_reference
from indexcache_train.ops.masking import KeyRange
from indexcache_train.ops.sparse_mla_reference import sparse_mla_reference

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


def _use_kernel(
    backend: Backend, x: torch.Tensor, available: bool, what: str, why_not: str | None = None
) -> bool:
    """``why_not``: the reason the kernel cannot take these dims (``None`` when it can); ``auto``
    then runs the PyTorch reference, ``triton`` reports it."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} unknown; use one of {BACKENDS}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not x.is_cuda or not available or why_not:
            if not x.is_cuda:
                detail = f"device {x.device}"
            else:
                detail = why_not or "Triton is not importable"
            raise RuntimeError(
                f"kernel_backend='triton' but no {what} kernel can run here ({detail}); "
                "set model.kernel_backend=auto (PyTorch where no kernel applies) or torch."
            )
        return True
    return x.is_cuda and available and not why_not


def indexer_topk(
    q_BSID: torch.Tensor,
    k_BTD: torch.Tensor,
    w_BSI: torch.Tensor,
    topk: int,
    softmax_scale: float,
    key_range: KeyRange | None = None,
    *,
    backend: Backend = "auto",
    chunk: int = 256,
) -> torch.Tensor:
    """Top-k key indices ``[B, S, min(topk, T)]`` int32 (``-1`` = empty slot)."""
    from indexcache_train.ops import kernels

    flop_counter.add("indexer_topk", lambda: 2.0 * k_BTD.shape[1] * q_BSID.numel())

    why_not = kernel_dims.indexer_dims(q_BSID.shape[-1])
    if _use_kernel(backend, q_BSID, kernels.HAVE_INDEXER_TOPK, "indexer top-k", why_not):
        return kernels.indexer_topk(q_BSID, k_BTD, w_BSI, topk, softmax_scale, key_range)
    return indexer_topk_reference(q_BSID, k_BTD, w_BSI, topk, softmax_scale, key_range, chunk)


def sparse_mla(
    q_BSHD: torch.Tensor,
    kv_BTD: torch.Tensor,
    idx_BSK: torch.Tensor,
    softmax_scale: float,
    v_dim: int,
    *,
    backend: Backend = "auto",
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse absorbed-MLA attention over top-k indices: ``(out_BSHV, lse_BSH)``."""
    from indexcache_train.ops import kernels

    why_not = kernel_dims.sparse_mla_dims(q_BSHD.shape[-1], v_dim)
    if _use_kernel(backend, q_BSHD, kernels.HAVE_SPARSE_MLA, "sparse MLA", why_not):
        return kernels.sparse_mla(q_BSHD, kv_BTD, idx_BSK, softmax_scale, v_dim)
    return sparse_mla_reference(q_BSHD, kv_BTD, idx_BSK, softmax_scale, v_dim, chunk)


def dense_attention(
    q_BSHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHV: torch.Tensor,
    softmax_scale: float,
    key_range: KeyRange | None = None,
    *,
    backend: Backend = "auto",
    chunk: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention with per-head LSE: ``(out_BSHV, lse_BSH)``."""
    from indexcache_train.ops import kernels

    why_not = None
    if (
        q_BSHD.is_cuda
        and kernels.dense_attention_backend(q_BSHD, k_BTHD, v_BTHV, key_range) != "cudnn"
    ):
        why_not = kernel_dims.dense_attention_dims(q_BSHD.shape[-1], v_BTHV.shape[-1])
    if _use_kernel(backend, q_BSHD, kernels.HAVE_DENSE_ATTENTION, "dense attention", why_not):
        return kernels.dense_attention(q_BSHD, k_BTHD, v_BTHV, softmax_scale, key_range)
    return dense_attention_reference(q_BSHD, k_BTHD, v_BTHV, softmax_scale, key_range, chunk)
