"""Dense flash attention with per-row key ranges (Triton, forward + backward, per-head LSE).

For what cuDNN cannot do: KeyRange masks (packed documents: ``key_start`` = document start;
context parallel: ``query_index`` = global key-order position of a local query row, ``T != S``).
Plain causal attention goes to cuDNN (:mod:`indexcache_train.ops.cudnn_attention`).

Algorithm (FlashAttention-2)
    Forward: one program per (``BLOCK_M`` query rows, batch*head). The rows' union key window
    ``[min key_start, max query_index]`` is scanned in ``BLOCK_N`` key tiles with an online softmax
    (base-2 exponentials, scale folded into log2 space). Tiles inside every row's range
    (``max key_start <= tile``, ``tile end <= min query_index``: below the causal diagonal, inside
    one document) run without any mask; the others apply the element mask ``key_start <= t <=
    query_index``, so any per-row range is exact while tile skipping is at block granularity. MLA head dims are sums of two powers of two (qk 192 = 128 + 64,
    256 = 256): Q/K are loaded as two column tiles and the two dots summed, instead of padding.
    Saves only O and the LSE (natural log of the scaled logits, ``[B, S, H]`` fp32; ``-inf`` and a
    zero output for rows with no valid key).

    Backward: ``delta = rowsum(dO * O)`` (fp32); one kernel per key tile accumulates dK, dV over
    the query blocks that can see the tile (a ``[first, last]`` query-block range per key tile,
    computed from per-block ``max query_index`` / ``min key_start``), one kernel per query block
    accumulates dQ over its key window (interior tiles unmasked, as in the forward). No atomics:
    deterministic.

Accumulation
    bf16 tensor-core products with fp32 accumulators; softmax statistics, LSE, delta in fp32;
    P and dS are rounded to bf16 before their products (as in FlashAttention-2).

Known limits
    Value head dim a power of two (128 / 256); qk head dim a sum of two powers of two. Query
    blocks whose rows span several documents scan the union of their key windows (masked
    elements cost compute); CP zigzag query blocks that straddle the two chunks likewise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from indexcache_train.ops.kernel_dims import dense_attention_dims, split_pow2
from indexcache_train.ops.masking import KeyRange
from indexcache_train.ops.triton_common import INTERPRET, LN2, LOG2E, cast, mma

LN2_C: tl.constexpr = tl.constexpr(LN2)
LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)
QB_ROWS = 128  # granularity of the per-query-block bounds the dK/dV kernel reads (>= BLOCK_M)


def _fwd_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
    ]


@triton.jit
def _fwd_tile(
    qa, qb, m_i, l_i, acc, k_base, v_base, n0, ks, qi, T, stride_kt, stride_vt, scale_log2,
    offs_a, offs_b, offs_v,
    DB: tl.constexpr, MASK: tl.constexpr, INTERP: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One key tile of the online softmax. ``MASK=False`` only for interior tiles, where every
    row of the block may see every key of the tile (no range test, no bounds test)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    rows_n = offs_n.to(tl.int64)[:, None]
    if MASK:
        n_ok = (offs_n < T)[:, None]
        ka = tl.load(k_base + rows_n * stride_kt + offs_a[None, :], mask=n_ok, other=0.0)
    else:
        ka = tl.load(k_base + rows_n * stride_kt + offs_a[None, :])
    s = mma(qa, tl.trans(ka), INTERP)
    if DB > 0:
        if MASK:
            kb = tl.load(k_base + rows_n * stride_kt + offs_b[None, :], mask=n_ok, other=0.0)
        else:
            kb = tl.load(k_base + rows_n * stride_kt + offs_b[None, :])
        s += mma(qb, tl.trans(kb), INTERP)
    if MASK:
        valid = (offs_n[None, :] >= ks[:, None]) & (offs_n[None, :] <= qi[:, None])
        s = tl.where(valid, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with no valid key so far keep m = -inf; shift by 0 there so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        v = tl.load(v_base + rows_n * stride_vt + offs_v[None, :], mask=n_ok, other=0.0)
    else:
        s = s * scale_log2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = m_new
        v = tl.load(v_base + rows_n * stride_vt + offs_v[None, :])
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(cast(p, v.dtype, INTERP), v, INTERP)
    return m_new, l_i, acc


@triton.jit
def _interior(start, lo_rows, hi_rows, end, BLOCK_N: tl.constexpr):
    """``[a, b)``: the tiles (on the grid ``start + j*BLOCK_N``) inside every row's key range.

    ``lo_rows`` = the largest key_start of the block, ``hi_rows`` = its smallest query_index;
    tiles outside ``[a, b)`` (the diagonal, document edges) take the masked path.
    """
    a = start + tl.cdiv(tl.maximum(lo_rows - start, 0), BLOCK_N) * BLOCK_N
    a = tl.minimum(a, end)
    b = start + tl.maximum(hi_rows + 1 - start, 0) // BLOCK_N * BLOCK_N
    b = tl.minimum(tl.maximum(b, a), end)
    return a, b


@triton.autotune(configs=_fwd_configs(), key=["DA", "DB", "DV", "H"])
@triton.jit
def _attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    qi_ptr,
    ks_ptr,
    scale_log2,
    S,
    T,
    H,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lb,
    stride_ls,
    stride_rb,
    DA: tl.constexpr,
    DB: tl.constexpr,
    DV: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < S
    qi = tl.load(qi_ptr + b * stride_rb + offs_m, mask=row_ok, other=-1).to(tl.int32)
    ks = tl.load(ks_ptr + b * stride_rb + offs_m, mask=row_ok, other=2**30).to(tl.int32)
    lo = tl.maximum(tl.min(ks, axis=0), 0)
    hi = tl.minimum(tl.max(qi, axis=0), T - 1)
    start = (lo // BLOCK_N) * BLOCK_N

    offs_a = tl.arange(0, DA)
    offs_v = tl.arange(0, DV)
    q_row = q_ptr + b * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qs
    qa = tl.load(q_row + offs_a[None, :], mask=row_ok[:, None], other=0.0)
    if DB > 0:
        offs_b = DA + tl.arange(0, DB)
        qb = tl.load(q_row + offs_b[None, :], mask=row_ok[:, None], other=0.0)
    else:  # unused placeholders (a zero-width block is not allowed)
        offs_b = offs_a
        qb = qa

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    end = hi + 1
    ia, ib = _interior(
        start, tl.max(ks, axis=0), tl.minimum(tl.min(qi, axis=0), T - 1), end, BLOCK_N
    )
    for n0 in range(start, ia, BLOCK_N):
        m_i, l_i, acc = _fwd_tile(
            qa, qb, m_i, l_i, acc, k_base, v_base, n0, ks, qi, T, stride_kt, stride_vt, scale_log2,
            offs_a, offs_b, offs_v, DB, True, INTERP, BLOCK_N,
        )  # fmt: skip
    for n0 in range(ia, ib, BLOCK_N):
        m_i, l_i, acc = _fwd_tile(
            qa, qb, m_i, l_i, acc, k_base, v_base, n0, ks, qi, T, stride_kt, stride_vt, scale_log2,
            offs_a, offs_b, offs_v, DB, False, INTERP, BLOCK_N,
        )  # fmt: skip
    for n0 in range(ib, end, BLOCK_N):
        m_i, l_i, acc = _fwd_tile(
            qa, qb, m_i, l_i, acc, k_base, v_base, n0, ks, qi, T, stride_kt, stride_vt, scale_log2,
            offs_a, offs_b, offs_v, DB, True, INTERP, BLOCK_N,
        )  # fmt: skip

    has = l_i > 0.0
    out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * LN2_C, float("-inf"))
    o_ptrs = (
        o_ptr
        + b * stride_ob
        + h * stride_oh
        + offs_m.to(tl.int64)[:, None] * stride_os
        + offs_v[None, :]
    )
    tl.store(o_ptrs, cast(out, o_ptr.dtype.element_ty, INTERP), mask=row_ok[:, None])
    tl.store(lse_ptr + b * stride_lb + offs_m.to(tl.int64) * stride_ls + h, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    o_ptr,
    do_ptr,
    delta_ptr,
    S,
    H,
    stride_ob,
    stride_os,
    stride_oh,
    stride_db,
    stride_ds,
    stride_dh,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = tl.arange(0, DV)
    row_ok = offs_m < S
    o = tl.load(
        o_ptr
        + b * stride_ob
        + h * stride_oh
        + offs_m.to(tl.int64)[:, None] * stride_os
        + offs_v[None, :],
        mask=row_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        do_ptr
        + b * stride_db
        + h * stride_dh
        + offs_m.to(tl.int64)[:, None] * stride_ds
        + offs_v[None, :],
        mask=row_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    # delta is laid out [B, H, S] so the backward kernels read it contiguously per head.
    tl.store(delta_ptr + (b * H + h) * S + offs_m, tl.sum(o * do, 1), mask=row_ok)


def _bwd_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    ]


@triton.autotune(configs=_bwd_configs(), key=["DA", "DB", "DV", "H"])
@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    qi_ptr,
    ks_ptr,
    qblk_max_ptr,
    qblk_min_ptr,
    dk_ptr,
    dv_ptr,
    scale,
    scale_log2,
    S,
    T,
    H,
    NQB,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dos,
    stride_doh,
    stride_lb,
    stride_ls,
    stride_rb,
    DA: tl.constexpr,
    DB: tl.constexpr,
    DV: tl.constexpr,
    QB: tl.constexpr,
    NQB_P2: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK, dV for one key tile; loops over the query blocks (of size BLOCK_M) that can see it.

    ``qblk_max``/``qblk_min`` hold per-``QB``-row-block max query_index / min key_start (QB is the
    precompute granularity, a multiple of BLOCK_M); their ``[first, last]`` range bounds the loop.
    """
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < T
    offs_a = tl.arange(0, DA)
    offs_v = tl.arange(0, DV)
    k_base = k_ptr + b * stride_kb + h * stride_kh + offs_n.to(tl.int64)[:, None] * stride_kt
    ka = tl.load(k_base + offs_a[None, :], mask=n_ok[:, None], other=0.0)
    if DB > 0:
        offs_b = DA + tl.arange(0, DB)
        kb = tl.load(k_base + offs_b[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(
        v_ptr
        + b * stride_vb
        + h * stride_vh
        + offs_n.to(tl.int64)[:, None] * stride_vt
        + offs_v[None, :],
        mask=n_ok[:, None],
        other=0.0,
    )

    # First / last coarse query block (QB rows each) that can see a key of this tile: one
    # vector load of the per-block bounds instead of a scalar loop over all blocks.
    offs_j = tl.arange(0, NQB_P2)
    j_ok = offs_j < NQB
    qmax = tl.load(qblk_max_ptr + b * NQB + offs_j, mask=j_ok, other=-1)
    kmin = tl.load(qblk_min_ptr + b * NQB + offs_j, mask=j_ok, other=2**30)
    sees = (qmax >= n0) & (kmin < n0 + BLOCK_N) & j_ok
    first = tl.min(tl.where(sees, offs_j, NQB))
    last = tl.max(tl.where(sees, offs_j, -1))

    dk_a = tl.zeros([BLOCK_N, DA], dtype=tl.float32)
    if DB > 0:
        dk_b = tl.zeros([BLOCK_N, DB], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DV], dtype=tl.float32)
    q_head = q_ptr + b * stride_qb + h * stride_qh
    do_head = do_ptr + b * stride_dob + h * stride_doh
    for m0 in range(first * QB, (last + 1) * QB, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < S
        qi = tl.load(qi_ptr + b * stride_rb + offs_m, mask=row_ok, other=-1).to(tl.int32)
        ks = tl.load(ks_ptr + b * stride_rb + offs_m, mask=row_ok, other=2**30).to(tl.int32)
        qa = tl.load(
            q_head + offs_m.to(tl.int64)[:, None] * stride_qs + offs_a[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        # s^T [BLOCK_N, BLOCK_M]: keys on rows so dK/dV accumulate without transposing P.
        st = mma(ka, tl.trans(qa), INTERP)
        if DB > 0:
            qb = tl.load(
                q_head + offs_m.to(tl.int64)[:, None] * stride_qs + offs_b[None, :],
                mask=row_ok[:, None],
                other=0.0,
            )
            st += mma(kb, tl.trans(qb), INTERP)
        lse2 = (
            tl.load(
                lse_ptr + b * stride_lb + offs_m.to(tl.int64) * stride_ls + h,
                mask=row_ok,
                other=0.0,
            )
            * LOG2E_C
        )
        valid = (offs_n[:, None] >= ks[None, :]) & (offs_n[:, None] <= qi[None, :])
        # Rows with lse = -inf have no valid key, so `valid` is already False for all of them.
        pt = tl.where(valid, tl.exp2(st * scale_log2 - lse2[None, :]), 0.0)
        do = tl.load(
            do_head + offs_m.to(tl.int64)[:, None] * stride_dos + offs_v[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        dv += mma(cast(pt, do.dtype, INTERP), do, INTERP)
        dpt = mma(v, tl.trans(do), INTERP)
        delta = tl.load(delta_ptr + (b * H + h) * S + offs_m, mask=row_ok, other=0.0)
        dst = cast(pt * (dpt - delta[None, :]), qa.dtype, INTERP)
        dk_a += mma(dst, qa, INTERP)
        if DB > 0:
            dk_b += mma(dst, qb, INTERP)

    dk_base = dk_ptr + b * stride_kb + h * stride_kh + offs_n.to(tl.int64)[:, None] * stride_kt
    tl.store(
        dk_base + offs_a[None, :],
        cast(dk_a * scale, dk_ptr.dtype.element_ty, INTERP),
        mask=n_ok[:, None],
    )
    if DB > 0:
        tl.store(
            dk_base + offs_b[None, :],
            cast(dk_b * scale, dk_ptr.dtype.element_ty, INTERP),
            mask=n_ok[:, None],
        )
    tl.store(
        dv_ptr
        + b * stride_vb
        + h * stride_vh
        + offs_n.to(tl.int64)[:, None] * stride_vt
        + offs_v[None, :],
        cast(dv, dv_ptr.dtype.element_ty, INTERP),
        mask=n_ok[:, None],
    )


@triton.jit
def _dq_tile(
    qa, qb, do, lse2, delta, dq_a, dq_b, k_base, v_base, n0, ks, qi, T, stride_kt, stride_vt,
    scale_log2, offs_a, offs_b, offs_v,
    DB: tl.constexpr, MASK: tl.constexpr, INTERP: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One key tile of dQ; ``MASK=False`` for interior tiles (see :func:`_fwd_tile`)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    rows_n = offs_n.to(tl.int64)[:, None]
    if MASK:
        n_ok = (offs_n < T)[:, None]
        ka = tl.load(k_base + rows_n * stride_kt + offs_a[None, :], mask=n_ok, other=0.0)
        v = tl.load(v_base + rows_n * stride_vt + offs_v[None, :], mask=n_ok, other=0.0)
    else:
        ka = tl.load(k_base + rows_n * stride_kt + offs_a[None, :])
        v = tl.load(v_base + rows_n * stride_vt + offs_v[None, :])
    s = mma(qa, tl.trans(ka), INTERP)
    if DB > 0:
        if MASK:
            kb = tl.load(k_base + rows_n * stride_kt + offs_b[None, :], mask=n_ok, other=0.0)
        else:
            kb = tl.load(k_base + rows_n * stride_kt + offs_b[None, :])
        s += mma(qb, tl.trans(kb), INTERP)
    if MASK:
        valid = (offs_n[None, :] >= ks[:, None]) & (offs_n[None, :] <= qi[:, None])
        p = tl.where(valid, tl.exp2(s * scale_log2 - lse2[:, None]), 0.0)
    else:
        p = tl.exp2(s * scale_log2 - lse2[:, None])
    dp = mma(do, tl.trans(v), INTERP)
    ds = cast(p * (dp - delta[:, None]), qa.dtype, INTERP)
    dq_a += mma(ds, ka, INTERP)
    if DB > 0:
        dq_b += mma(ds, kb, INTERP)
    return dq_a, dq_b


@triton.autotune(configs=_bwd_configs(), key=["DA", "DB", "DV", "H"])
@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    qi_ptr,
    ks_ptr,
    dq_ptr,
    scale,
    scale_log2,
    S,
    T,
    H,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dos,
    stride_doh,
    stride_lb,
    stride_ls,
    stride_rb,
    DA: tl.constexpr,
    DB: tl.constexpr,
    DV: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dQ for one query block over its key window (same window and mask as the forward)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < S
    qi = tl.load(qi_ptr + b * stride_rb + offs_m, mask=row_ok, other=-1).to(tl.int32)
    ks = tl.load(ks_ptr + b * stride_rb + offs_m, mask=row_ok, other=2**30).to(tl.int32)
    lo = tl.maximum(tl.min(ks, axis=0), 0)
    hi = tl.minimum(tl.max(qi, axis=0), T - 1)
    start = (lo // BLOCK_N) * BLOCK_N

    offs_a = tl.arange(0, DA)
    offs_v = tl.arange(0, DV)
    q_row = q_ptr + b * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qs
    qa = tl.load(q_row + offs_a[None, :], mask=row_ok[:, None], other=0.0)
    if DB > 0:
        offs_b = DA + tl.arange(0, DB)
        qb = tl.load(q_row + offs_b[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(
        do_ptr
        + b * stride_dob
        + h * stride_doh
        + offs_m.to(tl.int64)[:, None] * stride_dos
        + offs_v[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    lse2 = (
        tl.load(
            lse_ptr + b * stride_lb + offs_m.to(tl.int64) * stride_ls + h, mask=row_ok, other=0.0
        )
        * LOG2E_C
    )
    delta = tl.load(delta_ptr + (b * H + h) * S + offs_m, mask=row_ok, other=0.0)

    dq_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    if DB > 0:
        dq_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    else:  # unused placeholders (a zero-width block is not allowed)
        offs_b = offs_a
        qb = qa
        dq_b = dq_a
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    end = hi + 1
    ia, ib = _interior(
        start, tl.max(ks, axis=0), tl.minimum(tl.min(qi, axis=0), T - 1), end, BLOCK_N
    )
    for n0 in range(start, ia, BLOCK_N):
        dq_a, dq_b = _dq_tile(
            qa, qb, do, lse2, delta, dq_a, dq_b, k_base, v_base, n0, ks, qi, T, stride_kt,
            stride_vt, scale_log2, offs_a, offs_b, offs_v, DB, True, INTERP, BLOCK_N,
        )  # fmt: skip
    for n0 in range(ia, ib, BLOCK_N):
        dq_a, dq_b = _dq_tile(
            qa, qb, do, lse2, delta, dq_a, dq_b, k_base, v_base, n0, ks, qi, T, stride_kt,
            stride_vt, scale_log2, offs_a, offs_b, offs_v, DB, False, INTERP, BLOCK_N,
        )  # fmt: skip
    for n0 in range(ib, end, BLOCK_N):
        dq_a, dq_b = _dq_tile(
            qa, qb, do, lse2, delta, dq_a, dq_b, k_base, v_base, n0, ks, qi, T, stride_kt,
            stride_vt, scale_log2, offs_a, offs_b, offs_v, DB, True, INTERP, BLOCK_N,
        )  # fmt: skip

    dq_base = dq_ptr + b * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qs
    tl.store(
        dq_base + offs_a[None, :],
        cast(dq_a * scale, dq_ptr.dtype.element_ty, INTERP),
        mask=row_ok[:, None],
    )
    if DB > 0:
        tl.store(
            dq_base + offs_b[None, :],
            cast(dq_b * scale, dq_ptr.dtype.element_ty, INTERP),
            mask=row_ok[:, None],
        )


def _check_dims(
    q_BSHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHV: torch.Tensor
) -> tuple[int, int, int]:
    D, V = q_BSHD.shape[-1], v_BTHV.shape[-1]
    if (
        k_BTHD.shape[-1] != D
        or k_BTHD.shape[2] != q_BSHD.shape[2]
        or v_BTHV.shape[2] != q_BSHD.shape[2]
    ):
        raise ValueError("dense attention kernel expects q/k/v with equal head counts and qk dims")
    if reason := dense_attention_dims(D, V):
        raise ValueError(reason)
    da, db = split_pow2(D)
    return da, db, V


def _range_tensors(key_range: KeyRange | None, B: int, S: int, device: torch.device):
    key_range = key_range or KeyRange.causal(B, S, device)
    qi_BS = key_range.query_index_BS.to(torch.int64).expand(B, S).contiguous()
    ks_BS = key_range.key_start_BS.to(torch.int64).expand(B, S).contiguous()
    return qi_BS, ks_BS


def _attn_fwd(q_BSHD, k_BTHD, v_BTHV, scale, qi_BS, ks_BS):
    B, S, H, _ = q_BSHD.shape
    T = k_BTHD.shape[1]
    da, db, V = _check_dims(q_BSHD, k_BTHD, v_BTHV)
    out = torch.empty(B, S, H, V, dtype=q_BSHD.dtype, device=q_BSHD.device)
    lse = torch.empty(B, S, H, dtype=torch.float32, device=q_BSHD.device)
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd_kernel[grid](
        q_BSHD, k_BTHD, v_BTHV, out, lse, qi_BS, ks_BS,
        scale * LOG2E, S, T, H,
        *q_BSHD.stride()[:3], *k_BTHD.stride()[:3], *v_BTHV.stride()[:3], *out.stride()[:3],
        *lse.stride()[:2], qi_BS.stride(0),
        DA=da, DB=db, DV=V, INTERP=INTERPRET,
    )  # fmt: skip
    return out, lse


def _attn_bwd(dout, q_BSHD, k_BTHD, v_BTHV, out, lse, scale, qi_BS, ks_BS):
    B, S, H, _ = q_BSHD.shape
    T = k_BTHD.shape[1]
    da, db, V = _check_dims(q_BSHD, k_BTHD, v_BTHV)
    dout = dout.contiguous()
    delta = torch.empty(B, H, S, dtype=torch.float32, device=q_BSHD.device)
    _attn_bwd_delta_kernel[(triton.cdiv(S, 64), B * H)](
        out, dout, delta, S, H, *out.stride()[:3], *dout.stride()[:3], DV=V, BLOCK_M=64,
    )  # fmt: skip
    # Per QB-row block: max query_index and min key_start (rows past S pad with empty ranges).
    nqb = triton.cdiv(S, QB_ROWS)
    pad = nqb * QB_ROWS - S
    qmax = torch.nn.functional.pad(qi_BS, (0, pad), value=-1).view(B, nqb, QB_ROWS).amax(-1)
    kmin = torch.nn.functional.pad(ks_BS, (0, pad), value=2**30).view(B, nqb, QB_ROWS).amin(-1)
    qmax = qmax.to(torch.int32).contiguous()
    kmin = kmin.clamp_max(2**30).to(torch.int32).contiguous()
    dq = torch.empty_like(q_BSHD)
    dk = torch.empty_like(k_BTHD)
    dv = torch.empty_like(v_BTHV)
    common = (scale, scale * LOG2E)
    grid_kv = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H)  # noqa: E731
    _attn_bwd_dkdv_kernel[grid_kv](
        q_BSHD, k_BTHD, v_BTHV, dout, lse, delta, qi_BS, ks_BS, qmax, kmin, dk, dv,
        *common, S, T, H, nqb,
        *q_BSHD.stride()[:3], *k_BTHD.stride()[:3], *v_BTHV.stride()[:3], *dout.stride()[:3],
        *lse.stride()[:2], qi_BS.stride(0),
        DA=da, DB=db, DV=V, QB=QB_ROWS, NQB_P2=triton.next_power_of_2(nqb), INTERP=INTERPRET,
    )  # fmt: skip
    grid_q = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_bwd_dq_kernel[grid_q](
        q_BSHD, k_BTHD, v_BTHV, dout, lse, delta, qi_BS, ks_BS, dq,
        *common, S, T, H,
        *q_BSHD.stride()[:3], *k_BTHD.stride()[:3], *v_BTHV.stride()[:3], *dout.stride()[:3],
        *lse.stride()[:2], qi_BS.stride(0),
        DA=da, DB=db, DV=V, INTERP=INTERPRET,
    )  # fmt: skip
    return dq, dk, dv


class _TritonDenseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BSHD, k_BTHD, v_BTHV, scale, qi_BS, ks_BS):  # type: ignore[override]
        q_BSHD, k_BTHD, v_BTHV = (x.contiguous() for x in (q_BSHD, k_BTHD, v_BTHV))
        out, lse = _attn_fwd(q_BSHD, k_BTHD, v_BTHV, scale, qi_BS, ks_BS)
        ctx.save_for_backward(q_BSHD, k_BTHD, v_BTHV, out, lse, qi_BS, ks_BS)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        q_BSHD, k_BTHD, v_BTHV, out, lse, qi_BS, ks_BS = ctx.saved_tensors
        dq, dk, dv = _attn_bwd(dout, q_BSHD, k_BTHD, v_BTHV, out, lse, ctx.scale, qi_BS, ks_BS)
        return dq, dk, dv, None, None, None


def dense_attention_triton(
    q_BSHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHV: torch.Tensor,
    softmax_scale: float,
    key_range: KeyRange | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked dense attention ``(out_BSHV, lse_BSH)`` with the Triton kernels (any KeyRange)."""
    B, S = q_BSHD.shape[:2]
    qi_BS, ks_BS = _range_tensors(key_range, B, S, q_BSHD.device)
    return _TritonDenseAttention.apply(q_BSHD, k_BTHD, v_BTHV, softmax_scale, qi_BS, ks_BS)
