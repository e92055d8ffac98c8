"""The ``triton`` kernel backend: one hook per operator over our Triton kernels (and cuDNN SDPA).

Every hook declines (:class:`~indexcache_train.ops.backends.Declined`) before any compute when
the inputs are not on CUDA or not bf16, when the kernel does not take the head dims
(:mod:`~indexcache_train.ops.kernel_dims`) or when Triton cannot be imported;
:func:`model_declines` applies the same rules to a model config. The kernel modules are imported inside the hooks, so this module (and config validation)
needs neither torch nor Triton at import.

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

import importlib
from functools import cache
from typing import TYPE_CHECKING

from indexcache_train.ops import kernel_dims
from indexcache_train.ops.backends import Declined, ModelFacts

if TYPE_CHECKING:
    import torch

    from indexcache_train.ops.masking import KeyRange
    from indexcache_train.ops.row_split import RowSplit


@cache
def triton_missing() -> str | None:
    """Why Triton cannot run here (``None``: it and the kernels' shared helpers import)."""
    try:
        importlib.import_module("indexcache_train.ops.triton_common")  # imports triton.language
    except ImportError as e:
        return f"Triton cannot be imported ({e})"
    return None


def _why_not(x: torch.Tensor, dims_reason: str | None) -> Declined | None:
    """The first reason, in the order cheapest to check: device, dtype, head dims, Triton."""
    if not x.is_cuda:
        return Declined(f"inputs are on {x.device}; the kernels run on CUDA")
    reason = kernel_dims.dtype_reason(str(x.dtype)) or dims_reason or triton_missing()
    return Declined(reason) if reason else None


def indexer_topk(
    *,
    q_BSID: torch.Tensor,
    k_BTD: torch.Tensor,
    w_BSI: torch.Tensor,
    topk: int,
    softmax_scale: float,
    key_range: KeyRange | None,
) -> torch.Tensor | Declined:
    """Hook for :func:`indexcache_train.ops.api.indexer_topk`."""
    declined = _why_not(q_BSID, kernel_dims.indexer_dims(q_BSID.shape[-1]))
    if declined:
        return declined
    from indexcache_train.ops.triton_indexer import indexer_topk_triton

    return indexer_topk_triton(q_BSID, k_BTD, w_BSI, topk, softmax_scale, key_range)


def dense_attention_kernel(
    q_BSHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHV: torch.Tensor, key_range: KeyRange | None
) -> str:
    """``"cudnn"`` or ``"triton"``: which kernel :func:`dense_attention` runs for CUDA inputs."""
    from indexcache_train.ops.cudnn_attention import cudnn_supported

    if key_range is None and cudnn_supported(q_BSHD, k_BTHD, v_BTHV):
        return "cudnn"
    return "triton"


def dense_attention(
    *,
    q_BSHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHV: torch.Tensor,
    softmax_scale: float,
    key_range: KeyRange | None,
) -> tuple[torch.Tensor, torch.Tensor] | Declined:
    """Hook for :func:`indexcache_train.ops.api.dense_attention`."""
    if q_BSHD.is_cuda and dense_attention_kernel(q_BSHD, k_BTHD, v_BTHV, key_range) == "cudnn":
        from indexcache_train.ops.cudnn_attention import dense_attention_cudnn

        return dense_attention_cudnn(q_BSHD, k_BTHD, v_BTHV, softmax_scale)
    dims = kernel_dims.dense_attention_dims(q_BSHD.shape[-1], v_BTHV.shape[-1])
    declined = _why_not(q_BSHD, dims)
    if declined:
        return declined
    from indexcache_train.ops.triton_dense_attention import dense_attention_triton

    return dense_attention_triton(q_BSHD, k_BTHD, v_BTHV, softmax_scale, key_range)


def sparse_mla(
    *,
    q_BSHD: torch.Tensor,
    kv_BTD: torch.Tensor,
    topk_BSK: torch.Tensor,
    softmax_scale: float,
    v_dim: int,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | Declined:
    """Hook for :func:`indexcache_train.ops.api.sparse_mla`."""
    declined = _why_not(q_BSHD, kernel_dims.sparse_mla_dims(q_BSHD.shape[-1], v_dim))
    if declined:
        return declined
    from indexcache_train.ops.triton_sparse_mla import sparse_mla_triton

    return sparse_mla_triton(q_BSHD, kv_BTD, topk_BSK, softmax_scale, v_dim, deterministic)


def sparse_distill(
    *,
    attn_q_BSHD: torch.Tensor,
    attn_kv_BTD: torch.Tensor,
    attn_lse_BSH: torch.Tensor,
    topk_BSK: torch.Tensor,
    attn_scale: float,
    idx_q_BSID: torch.Tensor,
    idx_k_BTD: torch.Tensor,
    idx_w_BSI: torch.Tensor,
    idx_scale: float,
    split: RowSplit,
) -> torch.Tensor | Declined:
    """Hook for :func:`indexcache_train.ops.api.sparse_distill`; any TP split: the kernel sums
    each chunk's per-slice head sums over the TP group (``split``) before normalising them."""
    dims = kernel_dims.distill_dims(attn_q_BSHD.shape[-1], idx_q_BSID.shape[-1], idx_scale)
    declined = _why_not(idx_q_BSID, dims)
    if declined:
        return declined
    from indexcache_train.ops.triton_distill import sparse_distill_triton

    return sparse_distill_triton(
        attn_q_BSHD.detach(), attn_kv_BTD.detach(), attn_lse_BSH.detach(), topk_BSK, attn_scale,
        idx_q_BSID, idx_k_BTD, idx_w_BSI, idx_scale, split,
    )  # fmt: skip


def dense_distill(
    *,
    attn_q_BSHD: torch.Tensor,
    attn_k_BTHD: torch.Tensor,
    attn_lse_BSH: torch.Tensor,
    key_range: KeyRange,
    attn_scale: float,
    idx_q_BSID: torch.Tensor,
    idx_k_BTD: torch.Tensor,
    idx_w_BSI: torch.Tensor,
    idx_scale: float,
    split: RowSplit,
) -> torch.Tensor | Declined:
    """Hook for :func:`indexcache_train.ops.api.dense_distill`; any TP split (the head sums
    are reduced between two kernels at TP > 1, one fused pass at TP = 1)."""
    dims = kernel_dims.distill_dims(attn_q_BSHD.shape[-1], idx_q_BSID.shape[-1], idx_scale)
    declined = _why_not(idx_q_BSID, dims)
    if declined:
        return declined
    from indexcache_train.ops.triton_distill import dense_distill_triton

    return dense_distill_triton(
        attn_q_BSHD.detach(), attn_k_BTHD.detach(), attn_lse_BSH.detach(), key_range, attn_scale,
        idx_q_BSID, idx_k_BTD, idx_w_BSI, idx_scale, split,
    )  # fmt: skip


def model_declines(facts: ModelFacts) -> list[str]:
    """The hooks' dims and TP rules for every operator the model's stages run, as sentences.

    Dense attention is left to run time: cuDNN (probed on the device) may take head dims the
    Triton kernel does not.
    """
    absorbed = facts.kv_lora_rank + facts.qk_rope_head_dim
    reasons = [
        kernel_dims.dtype_reason(facts.dtype),
        kernel_dims.indexer_dims(facts.index_head_dim),
    ]
    if "sparse" in facts.attention:
        reasons += [
            kernel_dims.sparse_mla_dims(absorbed, facts.kv_lora_rank),
            kernel_dims.distill_dims(absorbed, facts.index_head_dim, 1.0),
        ]
    if "dense" in facts.attention:
        reasons.append(kernel_dims.distill_dims(facts.qk_head_dim, facts.index_head_dim, 1.0))
    return [r for r in reasons if r]
