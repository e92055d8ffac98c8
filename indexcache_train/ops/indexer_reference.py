"""Lightning-indexer scoring and top-k, PyTorch reference (chunked over query rows).

``I[b, s, t] = sum_i w[b, s, i] * relu(scale * q[b, s, i] . k[b, t])`` in fp32, masked to the
row's key range, then ``topk(min(topk, T))``. Processed ``chunk`` query rows at a time, so the
largest temporary is ``[B, chunk, I, T]``; no ``[S, T]`` tensor exists.

The operation order (scale inside the ReLU, then the head-weighted sum) follows HF's
``GlmMoeDsaIndexer`` so that top-k sets match transformers bit for bit in fp32.
"""

from __future__ import annotations

import torch

from indexcache_train.ops.masking import KeyRange, acc, chunks

INVALID_INDEX = -1


def indexer_logits(
    q_BCID: torch.Tensor, k_BTD: torch.Tensor, w_BCI: torch.Tensor, softmax_scale: float
) -> torch.Tensor:
    """Unmasked index scores for a chunk of query rows: ``[B, C, T]`` fp32 (differentiable)."""
    dots_BCIT = torch.einsum("bcid,btd->bcit", acc(q_BCID), acc(k_BTD)) * softmax_scale
    return torch.einsum("bci,bcit->bct", acc(w_BCI), torch.relu(dots_BCIT))


@torch.no_grad()
def indexer_topk_reference(
    q_BSID: torch.Tensor,
    k_BTD: torch.Tensor,
    w_BSI: torch.Tensor,
    topk: int,
    softmax_scale: float,
    key_range: KeyRange | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Top-k key indices per query row: ``[B, S, min(topk, T)]`` int32, ``-1`` marks empty slots.

    Slots are ordered by descending score; a row with fewer than ``topk`` valid keys has its
    trailing slots set to ``-1`` (they must never be attended).
    """
    B, S = q_BSID.shape[:2]
    T = k_BTD.shape[1]
    K = min(topk, T)
    key_range = key_range or KeyRange.causal(B, S, q_BSID.device)
    out_BSK = torch.empty(B, S, K, dtype=torch.int32, device=q_BSID.device)
    for s0, s1 in chunks(S, chunk):
        scores_BCT = indexer_logits(q_BSID[:, s0:s1], k_BTD, w_BSI[:, s0:s1], softmax_scale)
        valid_BCT = key_range.rows(s0, s1).dense_mask(T)
        scores_BCT = scores_BCT.masked_fill(~valid_BCT, float("-inf"))
        vals_BCK, idx_BCK = scores_BCT.topk(K, dim=-1)
        out_BSK[:, s0:s1] = torch.where(
            torch.isinf(vals_BCK) & (vals_BCK < 0), INVALID_INDEX, idx_BCK
        ).to(torch.int32)
    return out_BSK
