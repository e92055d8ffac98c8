"""PyTorch reference of the two distillation terms: KL(p^(j) || q^(l)) summed over query rows.

``p^(j)``: layer j's main attention summed over *all* heads and L1-normalised: the head-mean
distribution ``p_t`` of facts section 4. Each tensor-parallel rank holds a slice of the heads
for every row; under sequence parallelism it computes the term for its own slice of the rows
(:class:`~indexcache_train.ops.row_split.RowSplit`): its partial head sums for every slice's
rows are reduced onto the slices' owners, chunk by chunk. The indexer gradients are then
per-rank partials that Megatron sums over TP (the indexer parameters carry the
``sequence_parallel`` tag); without sequence parallelism every rank computes every row and
Megatron averages. ``q^(l)``: softmax of the Full layer l's indexer logits on the same key set
(:mod:`~indexcache_train.ops.kl_reference`). Chunked: no ``[S, T]`` tensor; the targets are
detached and computed once per term.
"""

from __future__ import annotations

import torch

from indexcache_train.ops.kl_reference import dense_kl_sum, sparse_kl_sum
from indexcache_train.ops.masking import KeyRange, acc, chunks
from indexcache_train.ops.row_split import RowSplit
from indexcache_train.ops.sparse_mla_reference import _gather_BCKD


@torch.no_grad()
def head_sum_probs_topk(
    q_BSHD: torch.Tensor,
    kv_BTD: torch.Tensor,
    lse_BSH: torch.Tensor,
    topk_BSK: torch.Tensor,
    softmax_scale: float,
    chunk: int = 64,
) -> torch.Tensor:
    """``sum_h P_h[s, slot]`` on the selected keys (absorbed layout), ``[B, S, K]`` fp32."""
    B, S, _, _ = q_BSHD.shape
    out_BSK = torch.zeros(
        B, S, topk_BSK.shape[-1], dtype=acc(lse_BSH[:0]).dtype, device=q_BSHD.device
    )
    kv = acc(kv_BTD)
    for s0, s1 in chunks(S, chunk):
        idx_BCK = topk_BSK[:, s0:s1]
        kv_g = _gather_BCKD(kv, idx_BCK)
        s_BCHK = torch.einsum("bchd,bckd->bchk", acc(q_BSHD[:, s0:s1]), kv_g) * softmax_scale
        p_BCHK = torch.exp(s_BCHK - lse_BSH[:, s0:s1, :, None])
        p_BCHK = p_BCHK.masked_fill(~(idx_BCK >= 0)[:, :, None, :], 0.0).nan_to_num(0.0)
        out_BSK[:, s0:s1] = p_BCHK.sum(2)
    return out_BSK


@torch.no_grad()
def head_sum_probs_dense(
    q_BCHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    lse_BCH: torch.Tensor,
    valid_BCT: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """``sum_h P_h[c, t]`` over all keys for one query chunk (expanded layout), ``[B, C, T]``."""
    s_BHCT = torch.einsum("bchd,bthd->bhct", acc(q_BCHD), acc(k_BTHD)) * softmax_scale
    p_BHCT = torch.exp(s_BHCT - lse_BCH.transpose(1, 2)[..., None])
    return p_BHCT.masked_fill(~valid_BCT[:, None], 0.0).nan_to_num(0.0).sum(1)


def l1_normalize(p: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return p / p.sum(-1, keepdim=True).clamp_min(eps)


def sparse_distill_reference(
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
    chunk: int = 128,
) -> torch.Tensor:
    """Sparse stage: p and q over the group's shared top-k set (absorbed attention layout)."""
    q, kv, lse = attn_q_BSHD.detach(), attn_kv_BTD.detach(), attn_lse_BSH.detach()
    n = idx_q_BSID.shape[1]

    def partial(a0: int, a1: int) -> torch.Tensor:
        return head_sum_probs_topk(q[:, a0:a1], kv, lse[:, a0:a1], topk_BSK[:, a0:a1], attn_scale)

    p_BSK = torch.cat(
        [l1_normalize(split.reduced_rows(partial, s0, s1, n)) for s0, s1 in chunks(n, chunk)], 1
    )
    own_topk = split.own(topk_BSK)
    return sparse_kl_sum(p_BSK, own_topk, idx_q_BSID, idx_k_BTD, idx_w_BSI, idx_scale, chunk)


def dense_distill_reference(
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
    chunk: int = 128,
) -> torch.Tensor:
    """Dense warm-up: p and q over every valid (causal / same-document) key, one chunk at a time."""
    q, k, lse = attn_q_BSHD.detach(), attn_k_BTHD.detach(), attn_lse_BSH.detach()
    T = k.shape[1]
    n = idx_q_BSID.shape[1]

    def partial(a0: int, a1: int) -> torch.Tensor:
        valid = key_range.rows(a0, a1).dense_mask(T)
        return head_sum_probs_dense(q[:, a0:a1], k, lse[:, a0:a1], valid, attn_scale)

    def target(s0: int, s1: int) -> torch.Tensor:
        return l1_normalize(split.reduced_rows(partial, s0, s1, n))

    own_range = key_range.rows(split.rank * n, split.rank * n + n)
    return dense_kl_sum(target, own_range, idx_q_BSID, idx_k_BTD, idx_w_BSI, idx_scale, chunk)
