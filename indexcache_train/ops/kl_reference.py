"""KL(p || q_indexer), chunked, gradients in the forward: no ``[S, T]`` / ``[S, K, I]`` graph.

``q`` is the softmax of the Full layer's indexer logits ``z = sum_i w_i relu(scale q_i . k)`` over
the same key set as the target ``p`` (the group's shared top-k set in the sparse stage, all valid
causal keys in the dense warm-up). Forward runs chunk by chunk: each chunk's target is computed
once, its loss under a local autograd graph, and (when the indexer needs gradients) the chunk's
gradients into the indexer's q, k and head weights are taken there and then and accumulated;
backward only scales them by the incoming gradient (the loss is a scalar leaf, its gradient
linear in that scalar), as the Triton kernels do. So the dense target (a TP reduction each
time) is never recomputed, and what lives between forward and backward is ``dq``, ``dk``,
``dw`` (the size of the inputs the old recompute-in-backward form had to keep anyway). Rows
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


class _EagerKL(torch.autograd.Function):
    """Sum of per-chunk KL terms; the indexer gradients are computed in the forward.

    ``chunk_loss(s0, s1, q_c, k, w_c)`` is one query chunk's KL (its target built inside, once),
    differentiable in ``q_c``, ``k``, ``w_c``. The loss is a scalar leaf of the graph whose
    gradient is linear in the incoming ``grad``, so backward only scales the gradients the
    forward accumulated: neither the target nor the logits are recomputed, and what is kept
    between forward and backward is the size of ``q``, ``k`` and ``w`` (``dk`` in fp32).
    """

    @staticmethod
    def forward(ctx, chunk_loss, rows, chunk, want_grad, q_BSID, k_BTD, w_BSI):  # type: ignore[override]
        total = torch.zeros((), dtype=acc(w_BSI[:0]).dtype, device=w_BSI.device)
        if want_grad:
            dq, dw = torch.zeros_like(q_BSID), torch.zeros_like(w_BSI)
            dk = torch.zeros_like(k_BTD, dtype=acc(k_BTD[:0]).dtype)
        k_leaf = k_BTD.detach().requires_grad_(want_grad)
        for s0, s1 in chunks(rows, chunk):
            q_c = q_BSID[:, s0:s1].detach().requires_grad_(want_grad)
            w_c = w_BSI[:, s0:s1].detach().requires_grad_(want_grad)
            with torch.set_grad_enabled(want_grad):
                loss = chunk_loss(s0, s1, q_c, k_leaf, w_c)
            if want_grad:
                gq, gk, gw = torch.autograd.grad(loss, (q_c, k_leaf, w_c))
                dq[:, s0:s1] = gq
                dk += gk
                dw[:, s0:s1] = gw
            total += loss.detach()
        if want_grad:
            ctx.save_for_backward(dq, dk, dw)
            ctx.k_dtype = k_BTD.dtype
        return total

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        dq, dk, dw = ctx.saved_tensors
        return None, None, None, None, dq * grad, (dk * grad).to(ctx.k_dtype), dw * grad


def _eager_kl(chunk_loss, rows: int, chunk: int, q_BSID, k_BTD, w_BSI) -> torch.Tensor:
    want = torch.is_grad_enabled() and any(x.requires_grad for x in (q_BSID, k_BTD, w_BSI))
    return _EagerKL.apply(chunk_loss, rows, chunk, want, q_BSID, k_BTD, w_BSI)


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
    p_BSK = p_BSK.detach()

    def chunk_loss(s0: int, s1: int, q_c, k, w_c) -> torch.Tensor:
        idx = topk_BSK[:, s0:s1]
        z = _topk_logits(q_c, k, w_c, idx, softmax_scale)
        return _kl_rows(acc(p_BSK[:, s0:s1]), z, idx >= 0)

    return _eager_kl(chunk_loss, p_BSK.shape[1], chunk, q_BSID, k_BTD, w_BSI)


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
    normalised, detached ``p`` rows ``[B, s1-s0, T]`` (called once per chunk, in forward)."""
    T = k_BTD.shape[1]

    def chunk_loss(s0: int, s1: int, q_c, k, w_c) -> torch.Tensor:
        z = indexer_logits(q_c, k, w_c, softmax_scale)
        return _kl_rows(target_fn(s0, s1), z, key_range.rows(s0, s1).dense_mask(T))

    return _eager_kl(chunk_loss, q_BSID.shape[1], chunk, q_BSID, k_BTD, w_BSI)
