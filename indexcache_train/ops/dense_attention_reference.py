"""Dense causal attention with per-head LSE for MLA shapes (qk dim != v dim), PyTorch reference.

Flash-style chunking over query rows: the forward keeps ``[B, H, chunk, T]`` scores for one chunk
at a time and saves only inputs, output and LSE; backward recomputes each chunk. Masking follows
:class:`~indexcache_train.ops.masking.KeyRange`, so packed documents and context-parallel query
offsets work. This is the dense warm-up stage's attention on CPU and the GPU kernels' ground truth.
"""

from __future__ import annotations

import torch

from indexcache_train.ops.masking import KeyRange, acc, chunks


def _scores(q_BCHD, k_BTHD, valid_BCT, scale):
    s_BHCT = torch.einsum("bchd,bthd->bhct", q_BCHD, k_BTHD) * scale
    return s_BHCT.masked_fill(~valid_BCT[:, None], float("-inf"))


class _DenseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BSHD, k_BTHD, v_BTHV, scale, query_index_BS, key_start_BS, chunk):  # type: ignore[override]
        B, S, H, _ = q_BSHD.shape
        T, V = k_BTHD.shape[1], v_BTHV.shape[-1]
        rng = KeyRange(query_index_BS, key_start_BS)
        out32 = torch.zeros(B, S, H, V, dtype=acc(q_BSHD[:0]).dtype, device=q_BSHD.device)
        lse_BSH = torch.empty(B, S, H, dtype=acc(q_BSHD[:0]).dtype, device=q_BSHD.device)
        k32, v32 = acc(k_BTHD), acc(v_BTHV)
        for s0, s1 in chunks(S, chunk):
            s_BHCT = _scores(acc(q_BSHD[:, s0:s1]), k32, rng.rows(s0, s1).dense_mask(T), scale)
            lse_BHC = torch.logsumexp(s_BHCT, dim=-1)
            p_BHCT = torch.exp(s_BHCT - lse_BHC[..., None]).nan_to_num(0.0)
            out32[:, s0:s1] = torch.einsum("bhct,bthv->bchv", p_BHCT, v32)
            lse_BSH[:, s0:s1] = lse_BHC.transpose(1, 2)
        out = out32.to(q_BSHD.dtype)
        ctx.save_for_backward(q_BSHD, k_BTHD, v_BTHV, out, lse_BSH, query_index_BS, key_start_BS)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.mark_non_differentiable(lse_BSH)
        return out, lse_BSH

    @staticmethod
    def backward(ctx, dout_BSHV, _dlse):  # type: ignore[override]
        q_BSHD, k_BTHD, v_BTHV, out, lse_BSH, qi, ks = ctx.saved_tensors
        scale = ctx.scale
        T = k_BTHD.shape[1]
        rng = KeyRange(qi, ks)
        k32, v32 = acc(k_BTHD), acc(v_BTHV)
        dout32 = acc(dout_BSHV)
        delta_BSH = (dout32 * acc(out)).sum(-1)
        dq = torch.zeros_like(acc(q_BSHD))
        dk = torch.zeros_like(k32)
        dv = torch.zeros_like(v32)
        for s0, s1 in chunks(q_BSHD.shape[1], ctx.chunk):
            q_c = acc(q_BSHD[:, s0:s1])
            s_BHCT = _scores(q_c, k32, rng.rows(s0, s1).dense_mask(T), scale)
            p = torch.exp(s_BHCT - lse_BSH[:, s0:s1].transpose(1, 2)[..., None]).nan_to_num(0.0)
            do_c = dout32[:, s0:s1]
            dv += torch.einsum("bhct,bchv->bthv", p, do_c)
            dp = torch.einsum("bchv,bthv->bhct", do_c, v32)
            ds = p * (dp - delta_BSH[:, s0:s1].transpose(1, 2)[..., None])
            dq[:, s0:s1] = torch.einsum("bhct,bthd->bchd", ds, k32) * scale
            dk += torch.einsum("bhct,bchd->bthd", ds, q_c) * scale
        return dq.to(q_BSHD.dtype), dk.to(k_BTHD.dtype), dv.to(v_BTHV.dtype), None, None, None, None


def dense_attention_reference(
    q_BSHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHV: torch.Tensor,
    softmax_scale: float,
    key_range: KeyRange | None = None,
    chunk: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked dense attention; returns ``(out_BSHV, lse_BSH)``; rows without keys give 0 / -inf."""
    B, S = q_BSHD.shape[:2]
    key_range = key_range or KeyRange.causal(B, S, q_BSHD.device)
    return _DenseAttention.apply(
        q_BSHD,
        k_BTHD,
        v_BTHV,
        softmax_scale,
        key_range.query_index_BS.contiguous(),
        key_range.key_start_BS.contiguous(),
        chunk,
    )
