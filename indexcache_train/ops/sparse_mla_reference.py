"""Sparse MLA attention over per-query top-k keys, absorbed (MQA) layout, PyTorch reference.

Query ``[B, S, H, D]`` (D = kv_lora_rank + rope dim, 576 for GLM-5 / DeepSeek-V3.2), one shared
latent key ``[B, T, D]`` whose first ``v_dim`` channels are the value. Each row attends only its
``K`` selected keys; ``-1`` slots are skipped. Returns the output ``[B, S, H, v_dim]`` and the
per-head log-sum-exp ``[B, S, H]`` (fp32, natural log of the *scaled* logits) that the
distillation loss needs. Rows without a valid key output 0 with ``lse = -inf``.

Backward is flash-style: nothing but inputs, output and LSE is saved, and each query chunk is
recomputed, so memory stays O(S*K + chunk*K*D). Key gradients are accumulated with ``index_add_``
(deterministic on CPU); on CUDA, where this runs only as the fallback, ``deterministic=True``
accumulates them with ``index_put_(accumulate=True)`` under torch's deterministic algorithms
(sort-based) instead of atomics.
"""

from __future__ import annotations

import torch

from indexcache_train.ops.masking import acc, chunks


def _gather_BCKD(kv_BTD: torch.Tensor, idx_BCK: torch.Tensor) -> torch.Tensor:
    B, C, K = idx_BCK.shape
    safe = idx_BCK.long().clamp_min(0)
    return torch.gather(kv_BTD, 1, safe.reshape(B, C * K, 1).expand(-1, -1, kv_BTD.shape[-1])).view(
        B, C, K, -1
    )


def _chunk_probs(q_BCHD, kv_g_BCKD, valid_BCK, scale):
    s_BCHK = torch.einsum("bchd,bckd->bchk", q_BCHD, kv_g_BCKD) * scale
    s_BCHK = s_BCHK.masked_fill(~valid_BCK[:, :, None, :], float("-inf"))
    lse_BCH = torch.logsumexp(s_BCHK, dim=-1)
    p_BCHK = torch.exp(s_BCHK - lse_BCH[..., None]).nan_to_num(0.0)
    return p_BCHK, lse_BCH


class _SparseMLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BSHD, kv_BTD, idx_BSK, scale, v_dim, chunk, deterministic):  # type: ignore[override]
        B, S, H, _ = q_BSHD.shape
        out32 = torch.zeros(B, S, H, v_dim, dtype=acc(q_BSHD[:0]).dtype, device=q_BSHD.device)
        lse_BSH = torch.full(
            (B, S, H), float("-inf"), dtype=acc(q_BSHD[:0]).dtype, device=q_BSHD.device
        )
        kv32 = acc(kv_BTD)
        for s0, s1 in chunks(S, chunk):
            idx_BCK = idx_BSK[:, s0:s1]
            kv_g = _gather_BCKD(kv32, idx_BCK)
            p, lse = _chunk_probs(acc(q_BSHD[:, s0:s1]), kv_g, idx_BCK >= 0, scale)
            out32[:, s0:s1] = torch.einsum("bchk,bckv->bchv", p, kv_g[..., :v_dim])
            lse_BSH[:, s0:s1] = lse
        out = out32.to(q_BSHD.dtype)
        ctx.save_for_backward(q_BSHD, kv_BTD, idx_BSK, out, lse_BSH)
        ctx.scale, ctx.v_dim, ctx.chunk = scale, v_dim, chunk
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse_BSH)
        return out, lse_BSH

    @staticmethod
    def backward(ctx, dout_BSHV, _dlse):  # type: ignore[override]
        q_BSHD, kv_BTD, idx_BSK, out, lse_BSH = ctx.saved_tensors
        scale, v_dim = ctx.scale, ctx.v_dim
        B, S, H, D = q_BSHD.shape
        T = kv_BTD.shape[1]
        kv32 = acc(kv_BTD)
        dout32 = acc(dout_BSHV)
        delta_BSH = (dout32 * acc(out)).sum(-1)
        dq = torch.zeros(B, S, H, D, dtype=acc(q_BSHD[:0]).dtype, device=q_BSHD.device)
        dkv_flat = torch.zeros(B * T, D, dtype=acc(q_BSHD[:0]).dtype, device=q_BSHD.device)
        base_B = (torch.arange(B, device=q_BSHD.device) * T)[:, None, None]
        for s0, s1 in chunks(S, ctx.chunk):
            idx_BCK = idx_BSK[:, s0:s1]
            valid_BCK = idx_BCK >= 0
            kv_g = _gather_BCKD(kv32, idx_BCK)
            q_c = acc(q_BSHD[:, s0:s1])
            s_BCHK = torch.einsum("bchd,bckd->bchk", q_c, kv_g) * scale
            p = torch.exp(s_BCHK - lse_BSH[:, s0:s1, :, None]).masked_fill(
                ~valid_BCK[:, :, None], 0.0
            )
            p = p.nan_to_num(0.0)
            do_c = dout32[:, s0:s1]
            dp = torch.einsum("bchv,bckv->bchk", do_c, kv_g[..., :v_dim])
            ds = p * (dp - delta_BSH[:, s0:s1, :, None])
            dq[:, s0:s1] = torch.einsum("bchk,bckd->bchd", ds, kv_g) * scale
            dkv_g = torch.einsum("bchk,bchd->bckd", ds, q_c) * scale
            dkv_g[..., :v_dim] += torch.einsum("bchk,bchv->bckv", p, do_c)
            flat = (idx_BCK.long().clamp_min(0) + base_B).reshape(-1)
            dkv_g = dkv_g.masked_fill(~valid_BCK[..., None], 0.0).reshape(-1, D)
            _accumulate_rows(dkv_flat, flat, dkv_g, ctx.deterministic)
        return (
            dq.to(q_BSHD.dtype),
            dkv_flat.view(B, T, D).to(kv_BTD.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def _accumulate_rows(
    dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, deterministic: bool
) -> None:
    """``dst[rows] += src`` (repeated rows add up); CUDA atomics unless ``deterministic``."""
    if not (deterministic and dst.is_cuda):
        dst.index_add_(0, rows, src)
        return
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        dst.index_put_((rows,), src, accumulate=True)
    finally:
        torch.use_deterministic_algorithms(before)


def sparse_mla_reference(
    q_BSHD: torch.Tensor,
    kv_BTD: torch.Tensor,
    topk_BSK: torch.Tensor,
    softmax_scale: float,
    v_dim: int,
    chunk: int = 64,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse absorbed-MLA attention; returns ``(out_BSHV, lse_BSH)``."""
    return _SparseMLA.apply(q_BSHD, kv_BTD, topk_BSK, softmax_scale, v_dim, chunk, deterministic)
