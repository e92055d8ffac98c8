"""Distillation targets p: a layer's main attention, summed over heads (detached).

The caller sums the result over tensor-parallel ranks (each holds a slice of the heads) and then
L1-normalises, giving the head-mean distribution ``p_t`` of facts section 4.
"""

from __future__ import annotations

import torch

from indexcache_train.ops.masking import acc, chunks
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
