"""GPU kernels behind :mod:`indexcache_train.ops.api`.

Each ``HAVE_*`` flag says whether a fused kernel exists for that operator; the API falls back to
the PyTorch reference when it is ``False`` (here: when Triton cannot be imported) or when the
kernel does not take the head dims (:mod:`~indexcache_train.ops.kernel_dims`). The API only
calls into this module for CUDA tensors.

Which implementation runs:

=====================  ==================================================================
operator               implementation
=====================  ==================================================================
``indexer_topk``       Triton scoring kernel per query block + ``torch.topk`` on the block's
                       key window (:mod:`~indexcache_train.ops.triton_indexer`)
``dense_attention``    cuDNN SDPA (torch private op, with LSE) for ``key_range=None`` and
                       ``S == T`` when cuDNN takes the head dims (probed once, forward and
                       backward: :mod:`~indexcache_train.ops.cudnn_attention`); Triton
                       flash attention for every KeyRange (packed, CP) and for head dims
                       cuDNN refuses (:mod:`~indexcache_train.ops.triton_dense_attention`)
``sparse_mla``         Triton forward + backward, absorbed layout, fp32 atomics for dKV
                       (:mod:`~indexcache_train.ops.triton_sparse_mla`)
``sparse_distill``     Triton head-summed top-k probabilities + fused KL / indexer-gradient
                       kernel, gradients computed in the forward; TP through the row split's
                       reduction between the two (:mod:`~indexcache_train.ops.triton_distill`)
``dense_distill``      Triton flash-style dense KL (indexer LSE pass, head-mean target from the
                       main LSE, g = q - p per query chunk, dq/dw and dk kernels); one fused
                       pass at TP = 1, head sums + reduction + KL kernel at TP > 1
                       (:mod:`~indexcache_train.ops.triton_distill`)
=====================  ==================================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from indexcache_train.ops.masking import KeyRange
    from indexcache_train.ops.row_split import RowReduction

try:  # Triton is optional on CPU-only installs; the API then uses the references.
    from indexcache_train.ops.triton_dense_attention import dense_attention_triton
    from indexcache_train.ops.triton_distill import (
        dense_distill_triton,
        sparse_distill_triton,
    )
    from indexcache_train.ops.triton_indexer import indexer_topk_triton
    from indexcache_train.ops.triton_sparse_mla import sparse_mla_triton

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    _HAVE_TRITON = False

HAVE_INDEXER_TOPK = _HAVE_TRITON
HAVE_SPARSE_MLA = _HAVE_TRITON
HAVE_DENSE_ATTENTION = _HAVE_TRITON
HAVE_DISTILL = _HAVE_TRITON


def indexer_topk(
    q_BSID: torch.Tensor,
    k_BTD: torch.Tensor,
    w_BSI: torch.Tensor,
    topk: int,
    softmax_scale: float,
    key_range: KeyRange | None = None,
) -> torch.Tensor:
    """Top-k key indices ``[B, S, min(topk, T)]`` int32 (``-1`` = empty slot)."""
    if not HAVE_INDEXER_TOPK:  # pragma: no cover
        raise RuntimeError("no indexer top-k kernel is built in (Triton missing)")
    return indexer_topk_triton(q_BSID, k_BTD, w_BSI, topk, softmax_scale, key_range)


def sparse_mla(
    q_BSHD: torch.Tensor,
    kv_BTD: torch.Tensor,
    idx_BSK: torch.Tensor,
    softmax_scale: float,
    v_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse absorbed-MLA attention over top-k indices: ``(out_BSHV, lse_BSH)``."""
    if not HAVE_SPARSE_MLA:  # pragma: no cover
        raise RuntimeError("no sparse MLA kernel is built in (Triton missing)")
    return sparse_mla_triton(q_BSHD, kv_BTD, idx_BSK, softmax_scale, v_dim)


def dense_attention_backend(
    q_BSHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHV: torch.Tensor,
    key_range: KeyRange | None,
) -> str:
    """``"cudnn"`` or ``"triton"``: which kernel :func:`dense_attention` uses for these inputs."""
    from indexcache_train.ops.cudnn_attention import cudnn_supported

    if key_range is None and cudnn_supported(q_BSHD, k_BTHD, v_BTHV):
        return "cudnn"
    return "triton"


def dense_attention(
    q_BSHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHV: torch.Tensor,
    softmax_scale: float,
    key_range: KeyRange | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention with per-head LSE: ``(out_BSHV, lse_BSH)``."""
    if not HAVE_DENSE_ATTENTION:  # pragma: no cover
        raise RuntimeError("no dense attention kernel is built in (Triton missing)")
    if dense_attention_backend(q_BSHD, k_BTHD, v_BTHV, key_range) == "cudnn":
        from indexcache_train.ops.cudnn_attention import dense_attention_cudnn

        return dense_attention_cudnn(q_BSHD, k_BTHD, v_BTHV, softmax_scale)
    return dense_attention_triton(q_BSHD, k_BTHD, v_BTHV, softmax_scale, key_range)


def sparse_distill(
    attn_q_BSHD: torch.Tensor,
    attn_kv_BTD: torch.Tensor,
    attn_lse_BSH: torch.Tensor,
    topk_BSK: torch.Tensor,
    attn_scale: float,
    idx_q_BSID: torch.Tensor,
    idx_k_BTD: torch.Tensor,
    idx_w_BSI: torch.Tensor,
    idx_scale: float,
    split: RowReduction | None = None,
) -> torch.Tensor:
    """Sparse distillation term of this rank's rows (fp32 scalar; gradients into the indexer's
    q, k, w)."""
    if not HAVE_DISTILL:  # pragma: no cover
        raise RuntimeError("no distillation-loss kernel is built in (Triton missing)")
    return sparse_distill_triton(
        attn_q_BSHD, attn_kv_BTD, attn_lse_BSH, topk_BSK, attn_scale,
        idx_q_BSID, idx_k_BTD, idx_w_BSI, idx_scale, split,
    )  # fmt: skip


def dense_distill(
    attn_q_BSHD: torch.Tensor,
    attn_k_BTHD: torch.Tensor,
    attn_lse_BSH: torch.Tensor,
    key_range: KeyRange | None,
    attn_scale: float,
    idx_q_BSID: torch.Tensor,
    idx_k_BTD: torch.Tensor,
    idx_w_BSI: torch.Tensor,
    idx_scale: float,
    split: RowReduction | None = None,
) -> torch.Tensor:
    """Dense distillation term of this rank's rows over every valid key (fp32 scalar)."""
    if not HAVE_DISTILL:  # pragma: no cover
        raise RuntimeError("no distillation-loss kernel is built in (Triton missing)")
    return dense_distill_triton(
        attn_q_BSHD, attn_k_BTHD, attn_lse_BSH, key_range, attn_scale,
        idx_q_BSID, idx_k_BTD, idx_w_BSI, idx_scale, split,
    )  # fmt: skip
