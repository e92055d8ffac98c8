"""Sparse absorbed-MLA attention over per-query top-k indices (Triton, forward + backward).

Layout: query ``[B, S, H, D]`` (D = 576 = 512 latent + 64 rope), one shared latent key
``[B, T, D]`` whose first ``v_dim`` (= 512) channels are the value, indices ``[B, S, K]`` int32 of
global key positions, ``-1`` = empty slot. Packed documents and context parallel need nothing
here: the indexer already restricted the indices to each row's KeyRange.

Algorithm
    Forward (FlashMLA-style, one program per (query row, group of ``BLOCK_H`` = 64 heads)): the
    heads of one query share the same selected keys, so the ``[BLOCK_H, D]`` query tile stays
    on chip while the row's selected latent rows are gathered ``BLOCK_N`` at a time (row
    pointers from the index tile, masked loads for ``-1`` slots) and used twice: as K (all 576
    dims, split 512 + 64 so both tiles are powers of two) and as V (the first 512 dims). Online
    softmax in base 2; the loop stops after the row's last valid slot (found by a scan of the
    index row at program start), so causal rows with fewer than K valid keys do no dead work.
    Outputs O (bf16) and LSE (fp32, natural log of the scaled logits; ``-inf`` and O = 0 for a
    row without a valid key).

    Backward (one program per (query row, head group)): ``delta = rowsum(dO * O)`` is computed
    in the program; per key tile it recomputes ``P = exp(S - LSE)``, ``dP = dO V^T``,
    ``dS = P (dP - delta)``; the dQ launch accumulates ``dQ += dS K`` in registers, the dKV launch
    forms the tile's ``dKV = dS^T Q (+ P^T dO on the value dims)`` and **scatter-adds it with fp32
    atomics** into an fp32 ``[B, T, D]`` buffer (cast to the input dtype at the end). Two launches
    (``BWD_MODE = "split"``) recompute S/P/dP (1.4x the matmul work) but keep one set of
    accumulators live; the fused single launch spilled registers (sm_90 build: 255 regs + 1.3 KB
    stack) and measured 29.8 ms against 18.2 ms split (4K tokens, 64 heads, H100). The 512
    latent dims are handled as two 256-wide halves so the dKV tile stays at [BLOCK_N, 256] fp32.

Accumulation and determinism
    bf16 tensor-core products, fp32 accumulators, softmax statistics and LSE in fp32; P and dS
    are rounded to bf16 before their products (FlashAttention-2 practice). dKV uses fp32
    ``atomic_add``: the order in which query rows add into a key row is not fixed, so dKV is
    **not bitwise deterministic** run to run (differences at fp32 rounding, ~1e-7 relative,
    before the final bf16 cast). Chosen over a deterministic two-pass (sort (query, slot) pairs
    by key, then reduce per key) because that needs an O(S*K) pair list plus a sort per step and
    recomputes P/dS per pair without tensor cores; the atomics cost one fp32 red per element.

Known limits
    Absorbed layout only: the non-absorbed ``[B, T, H, D]`` key layout is not implemented (the
    model uses the absorbed form; ``api.sparse_mla`` only takes the absorbed layout). ``v_dim``
    must equal the larger power-of-two part of D (512 of 576). Heads are processed in groups of
    64: H = 128 gathers each selected key row twice (once per group) and doubles the dKV atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from indexcache_train.ops.kernel_dims import sparse_mla_dims, split_pow2
from indexcache_train.ops.triton_common import INTERPRET, LN2, LOG2E, cast, mma

# "fused": one backward launch (S, P, dP, dS once per tile, dQ and dKV accumulators both live);
# "split": a dQ launch and a dKV launch (recomputes S, P, dP: 1.4x the matmul work, no spills).
BWD_MODE = "split"  # measured on the H100: split 18.2 ms vs fused 29.8 ms (4K, 64 heads)

LN2_C: tl.constexpr = tl.constexpr(LN2)
LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)


def _fwd_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 32}, num_warps=16, num_stages=2),
        triton.Config({"BLOCK_N": 64}, num_warps=16, num_stages=2),
        triton.Config({"BLOCK_N": 64}, num_warps=16, num_stages=3),
    ]


@triton.jit
def _last_valid_slot(idx_row, TOPK, SCAN: tl.constexpr):
    """1 + position of the last ``>= 0`` slot of an index row (0 if none).

    ``SCAN`` covers the whole row in one load when K <= 2048 (the wrapper passes
    ``min(2048, next_pow2(K))``), so the scan costs one round trip, not a dependent chain.
    """
    nv = 0
    for c in range(0, TOPK, SCAN):
        offs = c + tl.arange(0, SCAN)
        ids = tl.load(idx_row + offs, mask=offs < TOPK, other=-1)
        nv = tl.maximum(nv, tl.max(tl.where(ids >= 0, offs + 1, 0), axis=0))
    return nv


@triton.autotune(configs=_fwd_configs(), key=["DA", "DB", "BLOCK_H"])
@triton.jit
def _sparse_mla_fwd_kernel(
    q_ptr,
    kv_ptr,
    idx_ptr,
    o_ptr,
    lse_ptr,
    scale_log2,
    H,
    TOPK,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kvb,
    stride_kvt,
    stride_ib,
    stride_is,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lb,
    stride_ls,
    DA: tl.constexpr,
    DB: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SCAN: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    hg = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_h = hg * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    offs_a = tl.arange(0, DA)
    offs_b = DA + tl.arange(0, DB)

    idx_row = idx_ptr + b * stride_ib + s * stride_is
    nv = _last_valid_slot(idx_row, TOPK, SCAN)

    q_row = q_ptr + b * stride_qb + s * stride_qs + offs_h[:, None] * stride_qh
    qa = tl.load(q_row + offs_a[None, :], mask=h_ok[:, None], other=0.0)
    qb = tl.load(q_row + offs_b[None, :], mask=h_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, DA], dtype=tl.float32)
    kv_base = kv_ptr + b * stride_kvb
    for n0 in range(0, nv, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ids = tl.load(idx_row + offs_n, mask=offs_n < TOPK, other=-1)
        valid = ids >= 0
        rows = tl.where(valid, ids, 0).to(tl.int64)
        # Gather: one latent row per selected key; -1 slots load zeros and are masked below.
        ka = tl.load(
            kv_base + rows[:, None] * stride_kvt + offs_a[None, :], mask=valid[:, None], other=0.0
        )
        kb = tl.load(
            kv_base + rows[:, None] * stride_kvt + offs_b[None, :], mask=valid[:, None], other=0.0
        )
        sc = mma(qa, tl.trans(ka), INTERP) + mma(qb, tl.trans(kb), INTERP)
        sc = tl.where(valid[None, :], sc * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # The value is the first DA latent dims: the same gathered tile serves as V.
        acc = acc * alpha[:, None] + mma(cast(p, ka.dtype, INTERP), ka, INTERP)
        m_i = m_new

    has = l_i > 0.0
    out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * LN2_C, float("-inf"))
    o_ptrs = o_ptr + b * stride_ob + s * stride_os + offs_h[:, None] * stride_oh + offs_a[None, :]
    tl.store(o_ptrs, cast(out, o_ptr.dtype.element_ty, INTERP), mask=h_ok[:, None])
    tl.store(lse_ptr + b * stride_lb + s * stride_ls + offs_h, lse, mask=h_ok)


def _bwd_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=1),
        triton.Config({"BLOCK_N": 32}, num_warps=16, num_stages=1),
        triton.Config({"BLOCK_N": 64}, num_warps=16, num_stages=1),
        triton.Config({"BLOCK_N": 64}, num_warps=16, num_stages=2),
    ]


@triton.autotune(
    configs=_bwd_configs(),
    key=["DA", "DB", "BLOCK_H", "DO_DQ", "DO_DKV"],
    reset_to_zero=["dkv_ptr"],
)
@triton.jit
def _sparse_mla_bwd_kernel(
    q_ptr,
    kv_ptr,
    idx_ptr,
    o_ptr,
    do_ptr,
    lse_ptr,
    dq_ptr,
    dkv_ptr,
    scale,
    scale_log2,
    H,
    TOPK,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kvb,
    stride_kvt,
    stride_ib,
    stride_is,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lb,
    stride_ls,
    stride_dkb,
    stride_dkt,
    DA: tl.constexpr,
    DB: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SCAN: tl.constexpr,
    DO_DQ: tl.constexpr,
    DO_DKV: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Backward for one (query row, head group); ``DO_DQ`` / ``DO_DKV`` select the outputs.

    Fused (both) computes S, P, dP, dS once per tile; split (two launches) recomputes them but
    keeps only one set of accumulators live (dQ: [BLOCK_H, 576] fp32; dKV: a [BLOCK_N, 256] tile),
    which avoids register spills (see ``BWD_MODE``).
    """
    DH: tl.constexpr = DA // 2
    s = tl.program_id(0).to(tl.int64)
    hg = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_h = hg * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    offs_0 = tl.arange(0, DH)
    offs_1 = DH + tl.arange(0, DH)
    offs_r = DA + tl.arange(0, DB)

    idx_row = idx_ptr + b * stride_ib + s * stride_is
    nv = _last_valid_slot(idx_row, TOPK, SCAN)

    q_row = q_ptr + b * stride_qb + s * stride_qs + offs_h[:, None] * stride_qh
    q0 = tl.load(q_row + offs_0[None, :], mask=h_ok[:, None], other=0.0)
    q1 = tl.load(q_row + offs_1[None, :], mask=h_ok[:, None], other=0.0)
    qr = tl.load(q_row + offs_r[None, :], mask=h_ok[:, None], other=0.0)
    o_row = offs_h[:, None] * stride_oh + b * stride_ob + s * stride_os
    do0 = tl.load(do_ptr + o_row + offs_0[None, :], mask=h_ok[:, None], other=0.0)
    do1 = tl.load(do_ptr + o_row + offs_1[None, :], mask=h_ok[:, None], other=0.0)
    o0 = tl.load(o_ptr + o_row + offs_0[None, :], mask=h_ok[:, None], other=0.0)
    o1 = tl.load(o_ptr + o_row + offs_1[None, :], mask=h_ok[:, None], other=0.0)
    # delta = rowsum(dO * O) in fp32, per head (FlashAttention-2's D term).
    delta = tl.sum(do0.to(tl.float32) * o0.to(tl.float32), 1) + tl.sum(
        do1.to(tl.float32) * o1.to(tl.float32), 1
    )
    lse2 = tl.load(lse_ptr + b * stride_lb + s * stride_ls + offs_h, mask=h_ok, other=0.0) * LOG2E_C

    dq0 = tl.zeros([BLOCK_H, DH], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_H, DH], dtype=tl.float32)
    dqr = tl.zeros([BLOCK_H, DB], dtype=tl.float32)
    kv_base = kv_ptr + b * stride_kvb
    dkv_base = dkv_ptr + b * stride_dkb
    for n0 in range(0, nv, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ids = tl.load(idx_row + offs_n, mask=offs_n < TOPK, other=-1)
        valid = ids >= 0
        rows = tl.where(valid, ids, 0).to(tl.int64)
        k_rows = kv_base + rows[:, None] * stride_kvt
        k0 = tl.load(k_rows + offs_0[None, :], mask=valid[:, None], other=0.0)
        k1 = tl.load(k_rows + offs_1[None, :], mask=valid[:, None], other=0.0)
        kr = tl.load(k_rows + offs_r[None, :], mask=valid[:, None], other=0.0)
        sc = mma(q0, tl.trans(k0), INTERP) + mma(q1, tl.trans(k1), INTERP)
        sc += mma(qr, tl.trans(kr), INTERP)
        # Padded heads (h >= H) and -1 slots must contribute nothing (their lse is a dummy 0).
        ok = h_ok[:, None] & valid[None, :]
        p = tl.where(ok, tl.exp2(sc * scale_log2 - lse2[:, None]), 0.0)
        dp = mma(do0, tl.trans(k0), INTERP) + mma(do1, tl.trans(k1), INTERP)
        # dS with the softmax scale folded in (dQ and dK both need scale * dS).
        ds = cast(p * (dp - delta[:, None]) * scale, q0.dtype, INTERP)
        if DO_DQ:
            dq0 += mma(ds, k0, INTERP)
            dq1 += mma(ds, k1, INTERP)
            dqr += mma(ds, kr, INTERP)
        if DO_DKV:
            pb_t = tl.trans(cast(p, q0.dtype, INTERP))
            ds_t = tl.trans(ds)
            d_rows = dkv_base + rows[:, None] * stride_dkt
            amask = valid[:, None]
            # One 256-wide half at a time keeps the live dKV tile at [BLOCK_N, 256] fp32.
            dk0 = mma(ds_t, q0, INTERP) + mma(pb_t, do0, INTERP)
            tl.atomic_add(d_rows + offs_0[None, :], dk0, mask=amask, sem="relaxed")
            dk1 = mma(ds_t, q1, INTERP) + mma(pb_t, do1, INTERP)
            tl.atomic_add(d_rows + offs_1[None, :], dk1, mask=amask, sem="relaxed")
            dkr = mma(ds_t, qr, INTERP)
            tl.atomic_add(d_rows + offs_r[None, :], dkr, mask=amask, sem="relaxed")

    if DO_DQ:
        dq_row = dq_ptr + b * stride_qb + s * stride_qs + offs_h[:, None] * stride_qh
        dq_ty = dq_ptr.dtype.element_ty
        tl.store(dq_row + offs_0[None, :], cast(dq0, dq_ty, INTERP), mask=h_ok[:, None])
        tl.store(dq_row + offs_1[None, :], cast(dq1, dq_ty, INTERP), mask=h_ok[:, None])
        tl.store(dq_row + offs_r[None, :], cast(dqr, dq_ty, INTERP), mask=h_ok[:, None])


def _scan(K: int) -> int:
    return min(2048, max(16, triton.next_power_of_2(K)))


def _block_h(H: int) -> int:
    return min(64, max(16, triton.next_power_of_2(H)))


def _check(q_BSHD: torch.Tensor, kv_BTD: torch.Tensor, idx_BSK: torch.Tensor, v_dim: int):
    D = q_BSHD.shape[-1]
    if kv_BTD.dim() != 3 or kv_BTD.shape[-1] != D:
        raise ValueError(
            "sparse MLA kernel expects the absorbed layout: kv [B, T, D], q [B, S, H, D]"
        )
    if reason := sparse_mla_dims(D, v_dim):
        raise ValueError(reason)
    da, db = split_pow2(D)
    if idx_BSK.shape[:2] != q_BSHD.shape[:2]:
        raise ValueError("indices must be [B, S, K]")
    return da, db


def _fwd(q_BSHD, kv_BTD, idx_BSK, scale, v_dim):
    B, S, H, _ = q_BSHD.shape
    da, db = _check(q_BSHD, kv_BTD, idx_BSK, v_dim)
    K = idx_BSK.shape[-1]
    out = torch.empty(B, S, H, da, dtype=q_BSHD.dtype, device=q_BSHD.device)
    lse = torch.empty(B, S, H, dtype=torch.float32, device=q_BSHD.device)
    bh = _block_h(H)
    _sparse_mla_fwd_kernel[(S, triton.cdiv(H, bh), B)](
        q_BSHD, kv_BTD, idx_BSK, out, lse, scale * LOG2E, H, K,
        *q_BSHD.stride()[:3], *kv_BTD.stride()[:2], *idx_BSK.stride()[:2], *out.stride()[:3],
        *lse.stride()[:2],
        DA=da, DB=db, BLOCK_H=bh, SCAN=_scan(K), INTERP=INTERPRET,
    )  # fmt: skip
    return out, lse


def _bwd(dout, q_BSHD, kv_BTD, idx_BSK, out, lse, scale, v_dim):
    B, S, H, _ = q_BSHD.shape
    da, db = _check(q_BSHD, kv_BTD, idx_BSK, v_dim)
    K = idx_BSK.shape[-1]
    dout = dout.contiguous()
    dq = torch.empty_like(q_BSHD)
    dkv32 = torch.zeros(kv_BTD.shape, dtype=torch.float32, device=kv_BTD.device)
    bh = _block_h(H)
    grid = (S, triton.cdiv(H, bh), B)
    args = (
        q_BSHD, kv_BTD, idx_BSK, out, dout, lse, dq, dkv32, scale, scale * LOG2E, H, K,
        *q_BSHD.stride()[:3], *kv_BTD.stride()[:2], *idx_BSK.stride()[:2], *out.stride()[:3],
        *lse.stride()[:2], *dkv32.stride()[:2],
    )  # fmt: skip
    modes = ((True, True),) if BWD_MODE == "fused" else ((True, False), (False, True))
    # dQ-only first: the dQ launch's autotuning zeroes dkv32 (reset_to_zero) before dKV runs.
    for do_dq, do_dkv in modes:
        _sparse_mla_bwd_kernel[grid](
            *args,
            DA=da,
            DB=db,
            BLOCK_H=bh,
            SCAN=_scan(K),
            DO_DQ=do_dq,
            DO_DKV=do_dkv,
            INTERP=INTERPRET,
        )
    return dq, dkv32.to(kv_BTD.dtype)


class _TritonSparseMLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BSHD, kv_BTD, idx_BSK, scale, v_dim):  # type: ignore[override]
        q_BSHD, kv_BTD = q_BSHD.contiguous(), kv_BTD.contiguous()
        idx_BSK = idx_BSK.to(torch.int32).contiguous()
        out, lse = _fwd(q_BSHD, kv_BTD, idx_BSK, scale, v_dim)
        ctx.save_for_backward(q_BSHD, kv_BTD, idx_BSK, out, lse)
        ctx.scale, ctx.v_dim = scale, v_dim
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        q_BSHD, kv_BTD, idx_BSK, out, lse = ctx.saved_tensors
        dq, dkv = _bwd(dout, q_BSHD, kv_BTD, idx_BSK, out, lse, ctx.scale, ctx.v_dim)
        return dq, dkv, None, None, None


def sparse_mla_triton(
    q_BSHD: torch.Tensor,
    kv_BTD: torch.Tensor,
    idx_BSK: torch.Tensor,
    softmax_scale: float,
    v_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse absorbed-MLA attention ``(out_BSHV, lse_BSH)`` with the Triton kernels."""
    return _TritonSparseMLA.apply(q_BSHD, kv_BTD, idx_BSK, softmax_scale, v_dim)
