"""KL(p || q_indexer), chunked with recompute in backward: memory O(S*K) sparse, O(chunk*T) dense.

``q`` is the softmax of the Full layer's indexer logits ``z = sum_i w_i relu(scale q_i . k)`` over
the same key set as the target ``p`` (the group's shared top-k set in the sparse stage, all valid
causal keys in the dense warm-up). Forward evaluates chunk by chunk without building a graph;
backward recomputes each chunk under autograd and accumulates gradients into the indexer's q, k
and head weights, so no ``[S, T]`` (dense) or ``[S, K, I]`` (sparse) graph is ever held. Rows
without a valid key contribute 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from indexcache_train.ops.indexer_reference import indexer_logits
from indexcache_train.ops.masking import KeyRange, acc, chunks

EPS = 1e-10
TargetFn = Callable[[int, int], torch.Tensor]


def _kl_rows(p: torch.Tensor, z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL(p_row || softmax(z_row)) restricted to ``valid`` slots."""
    z = z.masked_fill(~valid, float("-inf"))
    # A row with no valid key would make log_softmax NaN in forward *and* backward; give it
    # finite logits and let the mask zero its terms.
    z = torch.where(valid.any(-1, keepdim=True), z, torch.zeros_like(z))
    logq = torch.log_softmax(z, dim=-1)
    terms = p * (torch.log(p.clamp_min(EPS)) - logq)
    return terms.masked_fill(~valid | (p <= 0), 0.0).sum()


def _topk_logits(q_BCID, k_BTD, w_BCI, idx_BCK, scale):
    B, C, K = idx_BCK.shape
    safe = idx_BCK.long().clamp_min(0)
    k_BCKD = torch.gather(k_BTD, 1, safe.reshape(B, C * K, 1).expand(-1, -1, k_BTD.shape[-1])).view(
        B, C, K, -1
    )
    dots_BCIK = torch.einsum("bcid,bckd->bcik", acc(q_BCID), acc(k_BCKD)) * scale
    return torch.einsum("bci,bcik->bck", acc(w_BCI), torch.relu(dots_BCIK))


class _SparseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p_BSK, idx_BSK, scale, chunk, q_BSID, k_BTD, w_BSI):  # type: ignore[override]
        total = torch.zeros((), dtype=acc(p_BSK[:0]).dtype, device=p_BSK.device)
        for s0, s1 in chunks(p_BSK.shape[1], chunk):
            idx = idx_BSK[:, s0:s1]
            z = _topk_logits(q_BSID[:, s0:s1], k_BTD, w_BSI[:, s0:s1], idx, scale)
            total += _kl_rows(acc(p_BSK[:, s0:s1]), z, idx >= 0)
        ctx.save_for_backward(p_BSK, idx_BSK, q_BSID, k_BTD, w_BSI)
        ctx.scale, ctx.chunk = scale, chunk
        return total

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        p_BSK, idx_BSK, q_BSID, k_BTD, w_BSI = ctx.saved_tensors
        dq, dk, dw = torch.zeros_like(q_BSID), torch.zeros_like(k_BTD), torch.zeros_like(w_BSI)
        k_leaf = k_BTD.detach().requires_grad_(True)
        for s0, s1 in chunks(p_BSK.shape[1], ctx.chunk):
            idx = idx_BSK[:, s0:s1]
            q_c = q_BSID[:, s0:s1].detach().requires_grad_(True)
            w_c = w_BSI[:, s0:s1].detach().requires_grad_(True)
            with torch.enable_grad():
                z = _topk_logits(q_c, k_leaf, w_c, idx, ctx.scale)
                loss = _kl_rows(acc(p_BSK[:, s0:s1]), z, idx >= 0)
                gq, gk, gw = torch.autograd.grad(loss, (q_c, k_leaf, w_c), grad)
            dq[:, s0:s1] = gq
            dk += gk
            dw[:, s0:s1] = gw
        return None, None, None, None, dq, dk, dw


class _DenseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, target_fn, key_range, scale, chunk, q_BSID, k_BTD, w_BSI):  # type: ignore[override]
        T = k_BTD.shape[1]
        total = torch.zeros((), dtype=acc(w_BSI[:0]).dtype, device=w_BSI.device)
        for s0, s1 in chunks(q_BSID.shape[1], chunk):
            z = indexer_logits(q_BSID[:, s0:s1], k_BTD, w_BSI[:, s0:s1], scale)
            total += _kl_rows(target_fn(s0, s1), z, key_range.rows(s0, s1).dense_mask(T))
        ctx.save_for_backward(q_BSID, k_BTD, w_BSI)
        ctx.target_fn, ctx.key_range, ctx.scale, ctx.chunk = target_fn, key_range, scale, chunk
        return total

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        q_BSID, k_BTD, w_BSI = ctx.saved_tensors
        T = k_BTD.shape[1]
        dq, dk, dw = torch.zeros_like(q_BSID), torch.zeros_like(k_BTD), torch.zeros_like(w_BSI)
        k_leaf = k_BTD.detach().requires_grad_(True)
        for s0, s1 in chunks(q_BSID.shape[1], ctx.chunk):
            q_c = q_BSID[:, s0:s1].detach().requires_grad_(True)
            w_c = w_BSI[:, s0:s1].detach().requires_grad_(True)
            p = ctx.target_fn(s0, s1)
            with torch.enable_grad():
                z = indexer_logits(q_c, k_leaf, w_c, ctx.scale)
                loss = _kl_rows(p, z, ctx.key_range.rows(s0, s1).dense_mask(T))
                gq, gk, gw = torch.autograd.grad(loss, (q_c, k_leaf, w_c), grad)
            dq[:, s0:s1] = gq
            dk += gk
            dw[:, s0:s1] = gw
        return None, None, None, None, dq, dk, dw


def sparse_kl_sum(
    p_BSK: torch.Tensor,
    topk_BSK: torch.Tensor,
    q_BSID: torch.Tensor,
    k_BTD: torch.Tensor,
    w_BSI: torch.Tensor,
    softmax_scale: float,
    chunk: int = 128,
) -> torch.Tensor:
    """``sum_s KL(p_s || softmax(z_s))`` over each row's selected keys (``-1`` slots ignored)."""
    return _SparseKL.apply(p_BSK.detach(), topk_BSK, softmax_scale, chunk, q_BSID, k_BTD, w_BSI)


def dense_kl_sum(
    target_fn: TargetFn,
    key_range: KeyRange,
    q_BSID: torch.Tensor,
    k_BTD: torch.Tensor,
    w_BSI: torch.Tensor,
    softmax_scale: float,
    chunk: int = 128,
) -> torch.Tensor:
    """``sum_s KL(p_s || softmax(z_s))`` over all valid keys; ``target_fn(s0, s1)`` gives the
    normalised, detached ``p`` rows ``[B, s1-s0, T]`` and is called again in backward."""
    return _DenseKL.apply(target_fn, key_range, softmax_scale, chunk, q_BSID, k_BTD, w_BSI)
