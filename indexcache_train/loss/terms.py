"""One served layer's distillation term: KL(p^(j) || q^(l)) summed over query rows.

``p^(j)``: layer j's main attention, summed over *all* heads (all-reduced over tensor-parallel
ranks, which each hold a slice of the heads) and L1-normalised — the same on every TP rank, so the
indexer gradients are identical across TP ranks and Megatron's TP averaging keeps them equal to
the TP=1 gradients. ``q^(l)``: softmax of the Full layer l's indexer logits on the same key set.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from indexcache_train.loss.kl import dense_kl_sum, sparse_kl_sum
from indexcache_train.loss.targets import head_sum_probs_dense, head_sum_probs_topk, l1_normalize
from indexcache_train.ops.masking import KeyRange


def tp_sum(p: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """In-place sum over the tensor-parallel ranks (each holds a slice of the heads)."""
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(p, group=tp_group)
    return p


def _use_distill_kernel(
    backend: str, attn_q_BSHD: torch.Tensor, idx_q_BSID: torch.Tensor, idx_scale: float,
    tp_ok: bool = True,
) -> bool:  # fmt: skip
    """Dispatch as in :mod:`indexcache_train.ops.api`: ``"auto"`` runs the fused Triton kernels
    (:mod:`indexcache_train.ops.triton_distill`) on CUDA inputs they take, ``"torch"`` this
    module's chunked path, ``"triton"`` the kernels or an error."""
    if backend == "auto" and not idx_q_BSID.is_cuda:
        return False
    from indexcache_train.ops import kernel_dims, kernels
    from indexcache_train.ops.api import _use_kernel

    why_not = kernel_dims.distill_dims(attn_q_BSHD.shape[-1], idx_q_BSID.shape[-1], idx_scale)
    if not tp_ok:
        why_not = "the dense distillation kernel runs at tensor-parallel size 1 only"
    return _use_kernel(backend, idx_q_BSID, kernels.HAVE_DISTILL, "distillation loss", why_not)  # type: ignore[arg-type]


def sparse_term(
    attn_q_BSHD: torch.Tensor,
    attn_kv_BTD: torch.Tensor,
    attn_lse_BSH: torch.Tensor,
    topk_BSK: torch.Tensor,
    attn_scale: float,
    idx_q_BSID: torch.Tensor,
    idx_k_BTD: torch.Tensor,
    idx_w_BSI: torch.Tensor,
    idx_scale: float,
    tp_group: dist.ProcessGroup | None = None,
    chunk: int = 128,
    backend: str = "auto",
) -> torch.Tensor:
    """Sparse stage: p and q over the group's shared top-k set (absorbed attention layout)."""
    if _use_distill_kernel(backend, attn_q_BSHD, idx_q_BSID, idx_scale):
        from indexcache_train.ops import kernels

        # The kernel sums each chunk's head sums over TP ranks before normalising them.
        reduce = None if tp_group is None else (lambda p: tp_sum(p, tp_group))
        return kernels.sparse_distill(
            attn_q_BSHD.detach(), attn_kv_BTD.detach(), attn_lse_BSH.detach(), topk_BSK,
            attn_scale, idx_q_BSID, idx_k_BTD, idx_w_BSI, idx_scale, reduce,
        )  # fmt: skip
    p_BSK = head_sum_probs_topk(attn_q_BSHD, attn_kv_BTD, attn_lse_BSH, topk_BSK, attn_scale, chunk)
    p_BSK = l1_normalize(tp_sum(p_BSK, tp_group))
    return sparse_kl_sum(p_BSK, topk_BSK, idx_q_BSID, idx_k_BTD, idx_w_BSI, idx_scale, chunk)


def dense_term(
    attn_q_BSHD: torch.Tensor,
    attn_k_BTHD: torch.Tensor,
    attn_lse_BSH: torch.Tensor,
    key_range: KeyRange,
    attn_scale: float,
    idx_q_BSID: torch.Tensor,
    idx_k_BTD: torch.Tensor,
    idx_w_BSI: torch.Tensor,
    idx_scale: float,
    tp_group: dist.ProcessGroup | None = None,
    chunk: int = 128,
    backend: str = "auto",
) -> torch.Tensor:
    """Dense warm-up: p and q over every valid (causal / same-document) key, one chunk at a time."""
    # The dense kernel never forms the [S, T] head sums a TP all-reduce would need: TP = 1 only.
    tp1 = tp_group is None or dist.get_world_size(tp_group) == 1
    if _use_distill_kernel(backend, attn_q_BSHD, idx_q_BSID, idx_scale, tp1):
        from indexcache_train.ops import kernels

        return kernels.dense_distill(
            attn_q_BSHD.detach(), attn_k_BTHD.detach(), attn_lse_BSH.detach(), key_range,
            attn_scale, idx_q_BSID, idx_k_BTD, idx_w_BSI, idx_scale,
        )  # fmt: skip
    q = attn_q_BSHD.detach()
    k = attn_k_BTHD.detach()
    lse = attn_lse_BSH.detach()
    T = k.shape[1]

    def target(s0: int, s1: int) -> torch.Tensor:
        valid = key_range.rows(s0, s1).dense_mask(T)
        p = head_sum_probs_dense(q[:, s0:s1], k, lse[:, s0:s1], valid, attn_scale)
        return l1_normalize(tp_sum(p, tp_group))

    return dense_kl_sum(target, key_range, idx_q_BSID, idx_k_BTD, idx_w_BSI, idx_scale, chunk)
