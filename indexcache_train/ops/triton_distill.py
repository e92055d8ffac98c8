"""Fused indexer distillation loss ``sum_s KL(p_s || softmax(z_s))`` (Triton), sparse and dense.

``p_s``: one served layer's main attention for query ``s``, summed over heads and L1-normalised
(detached). ``z_s``: the Full layer's indexer logits ``z[s, t] = sum_i w[s,i] relu(scale q[s,i].k[t])``
on the same key set. Gradients flow into the indexer's ``q [B,S,I,D]``, ``k [B,T,D]``, ``w [B,S,I]``.
Same contract as :mod:`indexcache_train.ops.kl_reference` (the reference): rows without a valid
key add 0.

Gradients are computed in the forward ("eager gradients")
    The loss is a scalar leaf of the autograd graph and its gradient is linear in the incoming
    scalar ``grad``, so when the indexer needs gradients the forward kernels also produce
    ``dKL/dq, dKL/dk, dKL/dw`` (``dz = q_indexer * sum(p) - p``) and backward only scales them by
    ``grad``. Nothing is recomputed in backward, and nothing of size ``[S, K]`` / ``[S, T]`` is held
    between forward and backward (the reference saves ``p [B,S,K]`` fp32 for its backward): what
    is saved is ``dq`` (q's dtype, the size of q), ``dk`` (fp32 ``[B,T,D]``) and ``dw`` (fp32).

Sparse term (the group's shared top-k set, absorbed main attention ``q [B,S,H,576]``,
``kv [B,T,576]``, LSE ``[B,S,H]``), query rows processed in chunks of ``C`` rows:

    1. ``_topk_probs_kernel`` (one program per (row, group of 64 heads)): the row's selected
       latent rows are gathered ``BLOCK_N`` at a time, ``exp(scale q.kv - lse_h)`` is summed over the
       head group and written to an fp32 ``[B, C, K]`` buffer (fp32 atomics when H > 64: two
       adds onto 0 are order-independent, so H <= 128 stays deterministic). Unnormalised.
    2. Tensor parallel (a ``split``, :class:`~indexcache_train.ops.row_split.RowReduction`):
       each rank holds a slice of the heads for every row but computes the term for its own
       slice of the rows, so step 1 runs for the chunk's rows of *every* slice (a
       ``[slices, B, C, K]`` buffer) and ``split.reduce`` sums slice ``j`` over the TP group
       onto rank ``j`` (one reduce-scatter); with TP = 1 there is one slice and no reduction.
    3. ``_topk_kl_kernel`` (one program per row): pass 1 gathers the row's indexer keys, forms
       ``z`` with one ``[I, D] x [D, BLOCK_N]`` product per tile and keeps an online
       log-sum-exp of ``z`` and ``sum(p)`` (the L1 norm, so normalisation happens here, after the
       TP sum); pass 2 recomputes ``z`` and accumulates the KL and the gradients: ``dq [I, D]``
       and ``dw [I]`` in registers, ``dk`` tile by tile with fp32 atomics (top-k rows of different
       queries hit the same keys).

    Memory: the ``[B, C, K]`` fp32 buffer (``C`` chosen to keep it under ``buffer_bytes``;
    all rows at once up to 64K rows with the default 512 MiB and K = 2048) plus O(S) outputs.
    One fused kernel for TP = 1 (p recomputed in both passes instead of stored) was not built:
    p costs ``2 H 576`` FLOPs per slot (9x the indexer's ``2 I D`` for GLM-5), so recomputing it
    would nearly double the time, while the buffer costs 8 bytes per slot of traffic.

Dense term (warm-up; expanded main attention ``q [B,S,H,Dqk]``, ``k [B,T,H,Dqk]``, its per-head
LSE, every key of the row's KeyRange), per chunk of ``C`` query rows and its key window
``[lo, hi]`` (the union of the rows' ranges), one fp32 ``[B, C, W]`` buffer reused:

    1. ``z`` for the chunk by the indexer's scoring kernel
       (:func:`~indexcache_train.ops.triton_indexer.indexer_scores_block`, masked to ``-inf``),
       then ``_row_lse_kernel``: the indexer's own log-sum-exp per row (first pass).
    2. ``_dense_g_kernel`` (one program per ``BLOCK_M x BLOCK_N`` tile): the head-summed main
       attention ``sum_h exp(scale q_h.k_h - lse_h) / H`` (one product per head, H heads looped;
       flash-style from the main LSE, no softmax pass needed), ``log q = z - lse_z``, the KL
       partial sums and ``g = q - p``, written over ``z`` in place.
    3. ``_dense_dq_kernel``: indexer rows stacked as ``(s, i)`` pairs (``[C*I, D]``, so one
       product serves all heads of a few rows): ``dq``, ``dw`` from ``g`` and recomputed dots.
    4. ``_dense_dk_kernel`` (per key tile, looping over the chunk rows that see it; the row
       loop is split over several programs when the window has few key tiles): ``dk``, added
       into an fp32 ``[B, T, D]`` buffer with atomics.

    The ``[C, W]`` buffer is the trade made for the indexer gradient: ``dq`` needs an ``[I, D]``
    accumulator per query row (``64 x 32 x 128`` fp32 for a 64-row block: no register file
    holds it), while ``p`` needs 64-row blocks to use the tensor cores; materialising ``g`` per
    chunk (~24 bytes of traffic per pair against ~74 KFLOP per pair for GLM-5) decouples the
    two so ``p`` is computed exactly once. Memory: ``buffer_bytes`` (constant) + O(S); no ``[S, T]``.
    The normaliser of ``p`` is the head count: each head's row sums to 1 (its LSE), so the
    head sum sums to H (the reference divides by the measured sum; they agree to the LSE's
    rounding, ~1e-6).

    Tensor parallel (``split``, as for the sparse term): step 2 is cut in two around the
    reduction. ``_dense_g_kernel`` stage 1 writes this rank's heads' unnormalised head sum for
    the chunk's rows of every slice, each over its own slice's key window (causal SP slices see
    different windows), into partial buffers after the ``z`` buffer; ``split.reduce`` sums them
    onto their owners (one reduce per slice, or one reduce-scatter when the windows agree);
    stage 2 is step 2's epilogue reading the reduced sum (normaliser: the heads of all ranks).
    ``C`` shrinks so ``z`` plus the ``slices`` partial buffers fit ``buffer_bytes``. With
    TP = 1 the fused stage 0 runs and nothing else changes.

Measured on the H100 (docs/benchmarks.md, GLM-5 dims, fwd + bwd): sparse 6.7 ms at 4K, 293 ms
at 128K (18-25x the PyTorch path); dense 4.1 ms at 4K, 718 ms at 64K, 2.9 s at 128K (29-36x).

Names: ``NI`` is the number of indexer heads (``I`` in shape suffixes), ``K`` the top-k slots.

Accumulation and determinism
    bf16 tensor-core products with fp32 accumulation; p, z, log-sum-exps, KL, g in fp32; the
    derivative of the ReLU'd dots is rounded to bf16 before its two products (FlashAttention-2
    practice). ``dk`` uses fp32 atomics (sparse: across query rows; dense: across row splits
    and chunks), so it is not bitwise reproducible run to run (fp32 rounding order); the loss,
    ``dq`` and ``dw`` are deterministic.

Known limits
    ``idx_scale > 0`` (folded into ``w`` through the ReLU, as the indexer kernel does); indexer
    head dim a power of two >= 16; main-attention dims a sum of two powers of two (576, 192,
    256). One host sync per dense call (the chunk key windows), none for sparse.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from indexcache_train.ops.kernel_dims import indexer_dims, split_pow2
from indexcache_train.ops.masking import KeyRange
from indexcache_train.ops.row_split import RowReduction
from indexcache_train.ops.triton_common import INTERPRET, LOG2E, cast, mma
from indexcache_train.ops.triton_indexer import _block_rows, indexer_scores_block
from indexcache_train.ops.triton_sparse_mla import _last_valid_slot

LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)
SPARSE_BUFFER = 1 << 29  # bytes of the [B, C, K] fp32 head-sum buffer
DENSE_BUFFER = 1 << 29  # bytes of the [B, C, W] fp32 z / g buffer
QB_ROWS = 64  # query-row granularity of the per-block bounds the dense dk kernel reads
CHUNK_ALIGN = 16 if INTERPRET else 128  # dense chunks hold a multiple of this many query rows


# =============================================================================== sparse term


def _probs_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # 64 heads x 576 query tile (72 KB) + 2 x 64-row latent stages (144 KB) fit in 227 KB.
    return [
        triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3),
    ]


@triton.autotune(configs=_probs_configs(), key=["DA", "DB", "BLOCK_H"], reset_to_zero=["p_ptr"])
@triton.jit
def _topk_probs_kernel(
    q_ptr,
    kv_ptr,
    lse_ptr,
    idx_ptr,
    p_ptr,
    scale_log2,
    H,
    TOPK,
    row0,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kvb,
    stride_kvt,
    stride_lb,
    stride_ls,
    stride_ib,
    stride_is,
    stride_pb,
    stride_ps,
    DA: tl.constexpr,
    DB: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SCAN: tl.constexpr,
    ATOMIC: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``p[b, r, slot] (+)= sum_{h in group} exp(scale q_h . kv[idx] - lse_h)`` for one row."""
    r = tl.program_id(0).to(tl.int64)  # row inside the chunk
    hg = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    s = row0 + r
    offs_h = hg * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_a = tl.arange(0, DA)
    offs_b = DA + tl.arange(0, DB)

    idx_row = idx_ptr + b * stride_ib + s * stride_is
    nv = _last_valid_slot(idx_row, TOPK, SCAN)

    lse2 = tl.load(lse_ptr + b * stride_lb + s * stride_ls + offs_h, mask=offs_h < H, other=0.0)
    lse2 = lse2 * LOG2E_C
    # Padded heads and heads without a valid key (lse = -inf) must add nothing.
    h_ok = (offs_h < H) & (lse2 > float("-inf"))
    lse2 = tl.where(h_ok, lse2, 0.0)
    q_row = q_ptr + b * stride_qb + s * stride_qs + offs_h[:, None] * stride_qh
    qa = tl.load(q_row + offs_a[None, :], mask=h_ok[:, None], other=0.0)
    qb = tl.load(q_row + offs_b[None, :], mask=h_ok[:, None], other=0.0)

    kv_base = kv_ptr + b * stride_kvb
    p_row = p_ptr + b * stride_pb + r * stride_ps
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
        pr = tl.exp2(sc * scale_log2 - lse2[:, None])
        pr = tl.where(h_ok[:, None] & valid[None, :], pr, 0.0)
        ps = tl.sum(pr, 0)
        if ATOMIC:
            tl.atomic_add(p_row + offs_n, ps, mask=offs_n < TOPK, sem="relaxed")
        else:
            tl.store(p_row + offs_n, ps, mask=offs_n < TOPK)


def _kl_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # One config: 4 warps spilled (255 registers + 24-48 B stack, sm_90 build); 8 warps do not.
    return [triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2)]


# dk_ptr accumulates across chunk launches: autotuning must leave it as it found it.
@triton.autotune(configs=_kl_configs(), key=["D", "BLOCK_I", "GRAD"], restore_value=["dk_ptr"])
@triton.jit
def _topk_kl_kernel(
    q_ptr,
    k_ptr,
    w_ptr,
    idx_ptr,
    p_ptr,
    kl_ptr,
    dq_ptr,
    dk_ptr,
    dw_ptr,
    scale,
    NI,
    TOPK,
    row0,
    stride_qb,
    stride_qs,
    stride_qi,
    stride_kb,
    stride_kt,
    stride_wb,
    stride_ws,
    stride_ib,
    stride_is,
    stride_pb,
    stride_ps,
    stride_lb,
    stride_dkb,
    stride_dkt,
    D: tl.constexpr,
    BLOCK_I: tl.constexpr,
    SCAN: tl.constexpr,
    GRAD: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """KL(p_hat || softmax(z)) of one row on its top-k slots, and (``GRAD``) dq, dw, dk.

    ``w`` is fp32 with the indexer scale folded in, so ``z = sum_i w_i relu(q_i . k)``.
    """
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    s = row0 + r
    offs_i = tl.arange(0, BLOCK_I)
    i_ok = offs_i < NI
    offs_d = tl.arange(0, D)
    q = tl.load(
        q_ptr + b * stride_qb + s * stride_qs + offs_i[:, None] * stride_qi + offs_d[None, :],
        mask=i_ok[:, None],
        other=0.0,
    )
    w = tl.load(w_ptr + b * stride_wb + s * stride_ws + offs_i, mask=i_ok, other=0.0)

    idx_row = idx_ptr + b * stride_ib + s * stride_is
    nv = _last_valid_slot(idx_row, TOPK, SCAN)
    p_row = p_ptr + b * stride_pb + r * stride_ps
    k_base = k_ptr + b * stride_kb

    # Pass 1: online log-sum-exp of z over the valid slots, and the L1 norm of p.
    m_i = tl.full([], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([], dtype=tl.float32)
    p_sum = tl.zeros([], dtype=tl.float32)
    for n0 in range(0, nv, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ids = tl.load(idx_row + offs_n, mask=offs_n < TOPK, other=-1)
        valid = ids >= 0
        rows = tl.where(valid, ids, 0).to(tl.int64)
        kt = tl.load(
            k_base + rows[:, None] * stride_kt + offs_d[None, :], mask=valid[:, None], other=0.0
        )
        dots = mma(q, tl.trans(kt), INTERP)  # [BLOCK_I, BLOCK_N]
        z = tl.sum(tl.maximum(dots, 0.0) * w[:, None], 0)
        z = tl.where(valid, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(z - m_safe), 0)
        m_i = m_new
        p_sum += tl.sum(tl.load(p_row + offs_n, mask=valid, other=0.0), 0)
    has = l_i > 0.0
    lse_z = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), 0.0)
    inv_c = 1.0 / tl.maximum(p_sum, 1e-10)  # l1_normalize's floor
    p_hat_sum = p_sum * inv_c  # 1 for rows with mass, 0 for rows without

    # Pass 2: recompute z; KL terms and dz = softmax(z) * sum(p_hat) - p_hat.
    kl = tl.zeros([], dtype=tl.float32)
    dq = tl.zeros([BLOCK_I, D], dtype=tl.float32)
    dw = tl.zeros([BLOCK_I], dtype=tl.float32)
    dk_base = dk_ptr + b * stride_dkb
    for n0 in range(0, nv, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ids = tl.load(idx_row + offs_n, mask=offs_n < TOPK, other=-1)
        valid = ids >= 0
        rows = tl.where(valid, ids, 0).to(tl.int64)
        kt = tl.load(
            k_base + rows[:, None] * stride_kt + offs_d[None, :], mask=valid[:, None], other=0.0
        )
        dots = mma(q, tl.trans(kt), INTERP)
        z = tl.sum(tl.maximum(dots, 0.0) * w[:, None], 0)
        log_q = z - lse_z
        p_hat = tl.load(p_row + offs_n, mask=valid, other=0.0) * inv_c
        pos = valid & (p_hat > 0.0)
        kl += tl.sum(tl.where(pos, p_hat * (tl.log(tl.where(pos, p_hat, 1.0)) - log_q), 0.0), 0)
        if GRAD:
            g = tl.where(valid, tl.exp(log_q) * p_hat_sum - p_hat, 0.0)
            dw += tl.sum(tl.maximum(dots, 0.0) * g[None, :], 1)
            dd = cast(tl.where(dots > 0.0, w[:, None] * g[None, :], 0.0), q.dtype, INTERP)
            dq += mma(dd, kt, INTERP)
            dk = mma(tl.trans(dd), q, INTERP)  # [BLOCK_N, D]
            tl.atomic_add(
                dk_base + rows[:, None] * stride_dkt + offs_d[None, :],
                dk,
                mask=valid[:, None],
                sem="relaxed",
            )
    tl.store(kl_ptr + b * stride_lb + s, kl)
    if GRAD:
        dq_ptrs = (
            dq_ptr + b * stride_qb + s * stride_qs + offs_i[:, None] * stride_qi + offs_d[None, :]
        )
        tl.store(dq_ptrs, cast(dq, dq_ptr.dtype.element_ty, INTERP), mask=i_ok[:, None])
        # dz/dw_i = scale relu(q_i . k): the folded scale comes back out here.
        tl.store(dw_ptr + b * stride_wb + s * stride_ws + offs_i, dw * scale, mask=i_ok)


def _scan(K: int) -> int:
    return min(2048, max(16, triton.next_power_of_2(K)))


def _check_indexer(q_BSID: torch.Tensor, k_BTD: torch.Tensor, w_BSI: torch.Tensor, scale: float):
    B, S, NI, D = q_BSID.shape
    if scale <= 0:
        raise ValueError(
            "distillation kernel folds the indexer scale into relu(): scale must be > 0"
        )
    if reason := indexer_dims(D):
        raise ValueError(reason)
    if k_BTD.shape[0] != B or k_BTD.shape[-1] != D or tuple(w_BSI.shape) != (B, S, NI):
        raise ValueError("indexer tensors must be q [B,S,I,D], k [B,T,D], w [B,S,I]")


def _indexer_inputs(q_BSID, k_BTD, w_BSI, scale):
    _check_indexer(q_BSID, k_BTD, w_BSI, scale)
    return q_BSID.contiguous(), k_BTD.contiguous(), (w_BSI.float() * scale).contiguous()


def _grad_buffers(q_BSID: torch.Tensor, k_BTD: torch.Tensor, want_grad: bool):
    B, S, NI, _ = q_BSID.shape
    dev = q_BSID.device
    if not want_grad:  # the kernels skip every gradient store; any pointer will do
        dummy = torch.empty(1, dtype=torch.float32, device=dev)
        return torch.empty(1, dtype=q_BSID.dtype, device=dev), dummy, dummy
    dq = torch.empty_like(q_BSID)
    dk32 = torch.zeros(k_BTD.shape, dtype=torch.float32, device=dev)
    dw32 = torch.empty(B, S, NI, dtype=torch.float32, device=dev)
    return dq, dk32, dw32


def _sparse_forward(
    attn_q_BSHD: torch.Tensor,
    attn_kv_BTD: torch.Tensor,
    attn_lse_BSH: torch.Tensor,
    topk_BSK: torch.Tensor,
    attn_scale: float,
    q_BSID: torch.Tensor,
    k_BTD: torch.Tensor,
    w_BSI: torch.Tensor,
    idx_scale: float,
    split: RowReduction | None,
    want_grad: bool,
    buffer_bytes: int,
):
    B, S, H, Da = attn_q_BSHD.shape
    da, db = split_pow2(Da)
    if attn_kv_BTD.shape[-1] != Da or attn_kv_BTD.dim() != 3:
        raise ValueError("sparse term expects the absorbed layout: q [B,S,H,D], kv [B,T,D]")
    if tuple(topk_BSK.shape[:2]) != (B, S) or tuple(attn_lse_BSH.shape) != (B, S, H):
        raise ValueError("topk must be [B, S, K] and the LSE [B, S, H]")
    tp = split is not None and split.tp_size > 1
    slices = split.slices if tp else 1
    q, k, w32 = _indexer_inputs(q_BSID, k_BTD, w_BSI, idx_scale)
    n, NI, D = q.shape[1:]
    if n * slices != S:
        raise ValueError(f"{n} indexer rows per slice x {slices} slices != {S} attention rows")
    aq, akv = attn_q_BSHD.contiguous(), attn_kv_BTD.contiguous()
    lse = attn_lse_BSH.float().contiguous()
    idx = topk_BSK.to(torch.int32).contiguous()
    own = (split.rank if tp else 0) * n
    idx_own = idx[:, own : own + n]  # the KL kernel's rows (a view; strides passed)
    K = idx.shape[-1]
    dev = aq.device
    kl_BS = torch.empty(B, n, dtype=torch.float32, device=dev)
    dq, dk32, dw32 = _grad_buffers(q, k, want_grad)
    dk_strides = dk32.stride()[:2] if want_grad else (0, 0)
    bh = min(64, max(16, triton.next_power_of_2(H)))
    n_groups = triton.cdiv(H, bh)
    C = max(1, min(n, buffer_bytes // max(1, slices * B * K * 4)))
    p_flat = torch.empty(slices * B * C * K, dtype=torch.float32, device=dev)
    scan = _scan(K)
    for s0 in range(0, n, C):
        rows = min(C, n - s0)
        parts = list(p_flat[: slices * B * rows * K].view(slices, B, rows, K))
        for j, p_BCK in enumerate(parts):  # this rank's heads for rows s0:s0+rows of slice j
            p_BCK.zero_()  # slots past a row's last valid index are never written
            _topk_probs_kernel[(rows, n_groups, B)](
                aq, akv, lse, idx, p_BCK, attn_scale * LOG2E, H, K, j * n + s0,
                *aq.stride()[:3], *akv.stride()[:2], *lse.stride()[:2], *idx.stride()[:2],
                *p_BCK.stride()[:2],
                DA=da, DB=db, BLOCK_H=bh, SCAN=scan, ATOMIC=n_groups > 1, INTERP=INTERPRET,
            )  # fmt: skip
        # TP: sum the head slices before the L1 norm (inside the KL kernel).
        p_BCK = split.reduce(parts) if tp else parts[0]
        _topk_kl_kernel[(rows, B)](
            q, k, w32, idx_own, p_BCK, kl_BS, dq, dk32, dw32, idx_scale, NI, K, s0,
            *q.stride()[:3], *k.stride()[:2], *w32.stride()[:2], *idx_own.stride()[:2],
            *p_BCK.stride()[:2], kl_BS.stride(0), *dk_strides,
            D=D, BLOCK_I=max(16, triton.next_power_of_2(NI)), SCAN=scan, GRAD=want_grad,
            INTERP=INTERPRET,
        )  # fmt: skip
    return kl_BS.sum(), dq, dk32, dw32


# =============================================================================== dense term


@triton.jit
def _row_lse_kernel(
    z_ptr,
    qi_ptr,
    ks_ptr,
    lse_ptr,
    rows,
    row0,
    win_lo,
    stride_zb,
    stride_zs,
    stride_rb,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Natural-log LSE of ``ROWS`` rows of the masked ``z`` buffer, each over its own key range
    (the column loop spans the rows' union; entries outside a row's range are masked)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_r = pid * ROWS + tl.arange(0, ROWS)
    r_ok = offs_r < rows
    grow = (row0 + offs_r).to(tl.int64)
    qi = tl.load(qi_ptr + b * stride_rb + grow, mask=r_ok, other=-1).to(tl.int32) - win_lo
    ks = tl.load(ks_ptr + b * stride_rb + grow, mask=r_ok, other=2**30).to(tl.int32) - win_lo
    lo = tl.maximum(tl.min(ks, axis=0), 0)
    hi = tl.max(qi, axis=0)  # inclusive; < lo when no row has a valid key
    z_rows = z_ptr + b * stride_zb + offs_r.to(tl.int64)[:, None] * stride_zs
    m_i = tl.full([ROWS, BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for c0 in range(lo, hi + 1, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        ok = (offs[None, :] >= ks[:, None]) & (offs[None, :] <= qi[:, None])
        z = tl.load(z_rows + offs[None, :], mask=ok, other=float("-inf")) * LOG2E_C
        m_new = tl.maximum(m_i, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.exp2(z - m_safe)
        m_i = m_new
    m = tl.max(m_i, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.sum(l_i * tl.exp2(m_i - m_safe[:, None]), 1)
    has = l_sum > 0.0
    lse = tl.where(has, (m_safe + tl.log2(tl.where(has, l_sum, 1.0))) / LOG2E_C, float("-inf"))
    tl.store(lse_ptr + b * stride_rb + grow, lse, mask=r_ok)


def _g_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    ]


# z is overwritten by g in place: autotuning must restore it between candidate runs.
@triton.autotune(configs=_g_configs(), key=["DA", "DB", "STAGE"], restore_value=["z_ptr"])
@triton.jit
def _dense_g_kernel(
    aq_ptr,
    ak_ptr,
    alse_ptr,
    qi_ptr,
    ks_ptr,
    lz_ptr,
    z_ptr,
    p_ptr,
    klp_ptr,
    scale_log2,
    inv_h,
    H,
    rows,
    row0,
    win_lo,
    win_len,
    stride_aqb,
    stride_aqs,
    stride_aqh,
    stride_akb,
    stride_akt,
    stride_akh,
    stride_alb,
    stride_als,
    stride_rb,
    stride_zb,
    stride_zs,
    stride_pb,
    stride_ps,
    stride_kpb,
    stride_kps,
    DA: tl.constexpr,
    DB: tl.constexpr,
    GROUP_M: tl.constexpr,
    STAGE: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of rows ``row0 + m`` against keys ``win_lo + n``.

    ``STAGE`` 0 (fused, TP = 1): p_hat (head mean of the main attention), log q, KL partial
    sums per row (stored per key tile), and ``g = q - p_hat`` written over ``z``.
    ``STAGE`` 1 (TP, this rank's heads): the masked, unnormalised head sum, stored to ``p``.
    ``STAGE`` 2 (TP, after the reduction): stage 0's epilogue with the head sum read from ``p``.
    """
    # Grouped order: GROUP_M query blocks sweep the key tiles together, so each head's key
    # tile is fetched from HBM once per GROUP_M query blocks (row-major order: once per block;
    # 256 -> ~60 bytes per pair with 132 programs in flight).
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    num_m = tl.cdiv(rows, BLOCK_M)
    num_n = tl.cdiv(win_len, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row inside the chunk
    row_ok = offs_m < rows
    grow = (row0 + offs_m).to(tl.int64)
    qi = tl.load(qi_ptr + b * stride_rb + grow, mask=row_ok, other=-1).to(tl.int32)
    ks = tl.load(ks_ptr + b * stride_rb + grow, mask=row_ok, other=2**30).to(tl.int32)
    offs_w = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # column inside the window
    col_ok = offs_w < win_len
    t = win_lo + offs_w
    n_first = win_lo + pid_n * BLOCK_N
    z_ptrs = z_ptr + b * stride_zb + offs_m.to(tl.int64)[:, None] * stride_zs + offs_w[None, :]
    p_ptrs = p_ptr + b * stride_pb + offs_m.to(tl.int64)[:, None] * stride_ps + offs_w[None, :]

    g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    kl = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Tiles no row can see (causal upper triangle, other documents) only write zeros.
    if (n_first <= tl.max(qi, axis=0)) & (n_first + BLOCK_N > tl.min(ks, axis=0)):
        p = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if STAGE != 2:
            offs_a = tl.arange(0, DA)
            aq_rows = aq_ptr + b * stride_aqb + grow[:, None] * stride_aqs
            ak_rows = ak_ptr + b * stride_akb + t.to(tl.int64)[:, None] * stride_akt
            for h in range(H):
                # One head's scores: its own q and k tiles (expanded layout), its own LSE.
                qa = tl.load(
                    aq_rows + h * stride_aqh + offs_a[None, :], mask=row_ok[:, None], other=0.0
                )
                ka = tl.load(
                    ak_rows + h * stride_akh + offs_a[None, :], mask=col_ok[:, None], other=0.0
                )
                sc = mma(qa, tl.trans(ka), INTERP)
                if DB > 0:
                    offs_b = DA + tl.arange(0, DB)
                    qb = tl.load(
                        aq_rows + h * stride_aqh + offs_b[None, :],
                        mask=row_ok[:, None],
                        other=0.0,
                    )
                    kb = tl.load(
                        ak_rows + h * stride_akh + offs_b[None, :],
                        mask=col_ok[:, None],
                        other=0.0,
                    )
                    sc += mma(qb, tl.trans(kb), INTERP)
                lse2 = tl.load(
                    alse_ptr + b * stride_alb + grow * stride_als + h, mask=row_ok, other=0.0
                )
                # exp2 may overflow to inf on masked entries (future keys, lse = -inf rows):
                # the valid mask below selects them away; no NaN can arise (no inf - inf).
                p += tl.exp2(sc * scale_log2 - lse2[:, None] * LOG2E_C)
        # The mask, z and log q only after the head loop: fewer registers live across it.
        valid = (t[None, :] >= ks[:, None]) & (t[None, :] <= qi[:, None]) & col_ok[None, :]
        if STAGE == 1:
            g = tl.where(valid, p, 0.0)  # stored to p below
        else:
            if STAGE == 2:
                p = tl.load(p_ptrs, mask=valid, other=0.0)
            z = tl.load(z_ptrs, mask=valid, other=0.0)
            lz = tl.load(lz_ptr + b * stride_rb + grow, mask=row_ok, other=0.0)
            log_q = z - lz[:, None]
            p_hat = tl.where(valid, p * inv_h, 0.0)
            g = tl.where(valid, tl.exp(log_q) - p_hat, 0.0)
            pos = valid & (p_hat > 0.0)
            kl = tl.sum(tl.where(pos, p_hat * (tl.log(tl.where(pos, p_hat, 1.0)) - log_q), 0.0), 1)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if STAGE == 1:
        tl.store(p_ptrs, g, mask=tile_ok)
    else:
        tl.store(z_ptrs, g, mask=tile_ok)
        tl.store(klp_ptr + b * stride_kpb + offs_m * stride_kps + pid_n, kl, mask=row_ok)


def _dq_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_R": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_R": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_R": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    ]


@triton.autotune(configs=_dq_configs(), key=["D"])
@triton.jit
def _dense_dq_kernel(
    q_ptr,
    k_ptr,
    w_ptr,
    qi_ptr,
    ks_ptr,
    g_ptr,
    dq_ptr,
    dw_ptr,
    scale,
    NI,
    T,
    rows,
    row0,
    win_lo,
    stride_qb,
    stride_kb,
    stride_kt,
    stride_wb,
    stride_rb,
    stride_gb,
    stride_gs,
    D: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dq, dw for ``BLOCK_R`` stacked indexer rows ``(s, i)`` (q viewed as ``[B, S*I, D]``)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # stacked row inside the chunk
    s_loc = offs_r // NI
    r_ok = s_loc < rows
    grow = (row0 + s_loc).to(tl.int64)
    qi = tl.load(qi_ptr + b * stride_rb + grow, mask=r_ok, other=-1).to(tl.int32)
    ks = tl.load(ks_ptr + b * stride_rb + grow, mask=r_ok, other=2**30).to(tl.int32)
    lo = tl.maximum(tl.min(ks, axis=0), 0)
    hi = tl.minimum(tl.max(qi, axis=0), T - 1)
    start = (lo // BLOCK_N) * BLOCK_N
    offs_d = tl.arange(0, D)
    srow = (row0 * NI + offs_r).to(tl.int64)  # stacked row in the whole sequence
    q = tl.load(
        q_ptr + b * stride_qb + srow[:, None] * D + offs_d[None, :], mask=r_ok[:, None], other=0.0
    )
    w = tl.load(w_ptr + b * stride_wb + srow, mask=r_ok, other=0.0)
    g_rows = g_ptr + b * stride_gb + s_loc.to(tl.int64)[:, None] * stride_gs - win_lo

    dq = tl.zeros([BLOCK_R, D], dtype=tl.float32)
    dw = tl.zeros([BLOCK_R], dtype=tl.float32)
    for n0 in range(start, hi + 1, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(
            k_ptr + b * stride_kb + t.to(tl.int64)[:, None] * stride_kt + offs_d[None, :],
            mask=(t < T)[:, None],
            other=0.0,
        )
        dots = mma(q, tl.trans(kt), INTERP)  # [BLOCK_R, BLOCK_N]
        valid = (t[None, :] >= ks[:, None]) & (t[None, :] <= qi[:, None])
        # g rows repeat for the I heads of a query row: the repeats are L1 hits.
        g = tl.load(g_rows + t[None, :], mask=valid, other=0.0)
        dw += tl.sum(tl.maximum(dots, 0.0) * g, 1)
        dd = cast(tl.where(dots > 0.0, g * w[:, None], 0.0), q.dtype, INTERP)
        dq += mma(dd, kt, INTERP)
    tl.store(
        dq_ptr + b * stride_qb + srow[:, None] * D + offs_d[None, :],
        cast(dq, dq_ptr.dtype.element_ty, INTERP),
        mask=r_ok[:, None],
    )
    tl.store(dw_ptr + b * stride_wb + srow, dw * scale, mask=r_ok)


def _dk_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_R": 64}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_R": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_R": 64}, num_warps=4, num_stages=3),
    ]


# dk_ptr accumulates across chunk launches: autotuning must leave it as it found it.
@triton.autotune(configs=_dk_configs(), key=["D", "BLOCK_N"], restore_value=["dk_ptr"])
@triton.jit
def _dense_dk_kernel(
    q_ptr,
    k_ptr,
    w_ptr,
    qi_ptr,
    ks_ptr,
    g_ptr,
    qmax_ptr,
    kmin_ptr,
    dk_ptr,
    NI,
    rows,
    row0,
    win_lo,
    win_len,
    NQB,
    stride_qb,
    stride_kb,
    stride_kt,
    stride_wb,
    stride_rb,
    stride_gb,
    stride_gs,
    stride_dkb,
    D: tl.constexpr,
    QB: tl.constexpr,
    NQB_P2: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dk for one key tile over the chunk rows that see it (a share of them: grid axis 1)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    b = tl.program_id(2).to(tl.int64)
    offs_w = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = offs_w < win_len
    t = win_lo + offs_w
    n_first = win_lo + pid_n * BLOCK_N
    offs_d = tl.arange(0, D)
    kt = tl.load(
        k_ptr + b * stride_kb + t.to(tl.int64)[:, None] * stride_kt + offs_d[None, :],
        mask=t_ok[:, None],
        other=0.0,
    )
    # First / last QB-row block of the chunk that can see a key of this tile (one vector load).
    offs_j = tl.arange(0, NQB_P2)
    j_ok = offs_j < NQB
    qmax = tl.load(qmax_ptr + b * NQB + offs_j, mask=j_ok, other=-1)
    kmin = tl.load(kmin_ptr + b * NQB + offs_j, mask=j_ok, other=2**30)
    sees = (qmax >= n_first) & (kmin < n_first + BLOCK_N) & j_ok
    first = tl.min(tl.where(sees, offs_j, NQB), axis=0)
    last = tl.max(tl.where(sees, offs_j, -1), axis=0)
    per = tl.cdiv(tl.maximum(last - first + 1, 0), n_split)
    j0 = first + split * per
    j1 = tl.minimum(j0 + per, last + 1)
    r0 = j0 * QB * NI
    r1 = tl.minimum(j1 * QB, rows) * NI

    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    g_cols = g_ptr + b * stride_gb + offs_w[None, :]
    for rs in range(r0, r1, BLOCK_R):
        offs_r = rs + tl.arange(0, BLOCK_R)
        r_ok = offs_r < r1
        s_loc = offs_r // NI
        grow = (row0 + s_loc).to(tl.int64)
        qi = tl.load(qi_ptr + b * stride_rb + grow, mask=r_ok, other=-1).to(tl.int32)
        ks = tl.load(ks_ptr + b * stride_rb + grow, mask=r_ok, other=2**30).to(tl.int32)
        srow = (row0 * NI + offs_r).to(tl.int64)
        q = tl.load(
            q_ptr + b * stride_qb + srow[:, None] * D + offs_d[None, :],
            mask=r_ok[:, None],
            other=0.0,
        )
        w = tl.load(w_ptr + b * stride_wb + srow, mask=r_ok, other=0.0)
        # Rows x keys, as in _dense_dq_kernel: the g tile is read along g's rows (keys are
        # contiguous in memory), where a keys x rows tile strides across rows in its fast dim.
        dots = mma(q, tl.trans(kt), INTERP)  # [BLOCK_R, BLOCK_N]
        valid = (t[None, :] >= ks[:, None]) & (t[None, :] <= qi[:, None]) & t_ok[None, :]
        g = tl.load(g_cols + s_loc.to(tl.int64)[:, None] * stride_gs, mask=valid, other=0.0)
        dd = cast(tl.where(dots > 0.0, g * w[:, None], 0.0), q.dtype, INTERP)
        dk += mma(tl.trans(dd), q, INTERP)
    if r1 > r0:
        tl.atomic_add(
            dk_ptr + b * stride_dkb + t.to(tl.int64)[:, None] * D + offs_d[None, :],
            dk,
            mask=t_ok[:, None],
            sem="relaxed",
        )


# Fixed tiles (not autotuned): the dk grid and the kl partial buffer depend on them. The
# interpreter runs larger tiles: its cost is per operation, not per element.
DK_BLOCK_N = 32 if INTERPRET else 64
LSE_ROWS, LSE_BLOCK = (16, 64) if INTERPRET else (4, 256)
G_GROUP_M = 2 if INTERPRET else 8  # the interpreter tests reach a full and a partial group


def _slice_windows(
    qi_BS: torch.Tensor, ks_BS: torch.Tensor, slices: int, T: int, C: int
) -> list[tuple[int, int, list[int], list[int]]]:
    """Per chunk of ``C`` rows of each of ``slices`` equal row slices: ``(row0, row1, lo, hi)``,
    ``lo[j]``/``hi[j]`` the key window any row of slice ``j``'s chunk sees (one host sync)."""
    B, S = qi_BS.shape
    n = S // slices
    nb = triton.cdiv(n, C)
    pad = nb * C - n
    qi = torch.nn.functional.pad(qi_BS.view(B, slices, n), (0, pad), value=-1)
    ks = torch.nn.functional.pad(ks_BS.view(B, slices, n), (0, pad), value=2**62)
    hi = qi.view(B, slices, nb, C).amax(dim=(0, 3)).clamp(-1, T - 1)
    lo = ks.view(B, slices, nb, C).amin(dim=(0, 3)).clamp(0, T)
    lo_l, hi_l = torch.stack([lo.T, hi.T]).tolist()  # [2][nb][slices]
    return [(s0, min(s0 + C, n), lo_l[i], hi_l[i]) for i, s0 in enumerate(range(0, n, C))]


def _g_launch(attn, rows_BS, lz_BS, z_BCW, p_BCW, klp_BCN, row0, lo, stage):
    """One launch of ``_dense_g_kernel`` over ``z_BCW``'s (stage 1: ``p_BCW``'s) tiles."""
    aq, ak, alse, scale_log2, inv_h = attn
    qi_BS, ks_BS = rows_BS
    out = p_BCW if stage == 1 else z_BCW
    B, rows, W = out.shape
    da, db = split_pow2(aq.shape[-1])

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(W, meta["BLOCK_N"]) * triton.cdiv(rows, meta["BLOCK_M"]), B)

    _dense_g_kernel[grid](
        aq, ak, alse, qi_BS, ks_BS, lz_BS, z_BCW, p_BCW, klp_BCN, scale_log2, inv_h, aq.shape[2],
        rows, row0, lo, W, *aq.stride()[:3], *ak.stride()[:3], *alse.stride()[:2],
        qi_BS.stride(0), z_BCW.stride(0), z_BCW.stride(1), p_BCW.stride(0), p_BCW.stride(1),
        klp_BCN.stride(0), klp_BCN.stride(1),
        DA=da, DB=db, GROUP_M=G_GROUP_M, STAGE=stage, INTERP=INTERPRET,
    )  # fmt: skip


def _reduced_head_sums(attn, rows_all, p_flat, split, chunk, n):
    """Stage 1 for rows ``chunk`` of every slice into ``p_flat``, reduced over TP: this rank's
    ``[B, rows, W]`` head sums (its slice's window)."""
    s0, s1, los, his = chunk
    B, rows = rows_all[0].shape[0], s1 - s0
    parts, off = [], 0
    for j, (lo, hi) in enumerate(zip(los, his)):
        W = max(hi - lo + 1, 0)
        part = p_flat[off : off + B * rows * W].view(B, rows, W)
        off += part.numel()
        if W:
            _g_launch(attn, rows_all, part, part, part, part, j * n + s0, lo, stage=1)
        parts.append(part)
    return split.reduce(parts)


def _dense_forward(
    attn_q_BSHD: torch.Tensor,
    attn_k_BTHD: torch.Tensor,
    attn_lse_BSH: torch.Tensor,
    key_range: KeyRange,
    attn_scale: float,
    q_BSID: torch.Tensor,
    k_BTD: torch.Tensor,
    w_BSI: torch.Tensor,
    idx_scale: float,
    split: RowReduction | None,
    want_grad: bool,
    buffer_bytes: int,
):
    B, S, H, Dqk = attn_q_BSHD.shape
    T = attn_k_BTHD.shape[1]
    if tuple(attn_k_BTHD.shape) != (B, T, H, Dqk) or tuple(attn_lse_BSH.shape) != (B, S, H):
        raise ValueError("dense term expects q [B,S,H,D], k [B,T,H,D], lse [B,S,H]")
    if k_BTD.shape[1] != T:
        raise ValueError("indexer keys and attention keys differ in length")
    tp = split is not None and split.tp_size > 1
    slices = split.slices if tp else 1
    q, k, w32 = _indexer_inputs(q_BSID, k_BTD, w_BSI, idx_scale)
    n = q.shape[1]
    if n * slices != S:
        raise ValueError(f"{n} indexer rows per slice x {slices} slices != {S} attention rows")
    aq, ak = attn_q_BSHD.contiguous(), attn_k_BTHD.contiguous()
    total_heads = H * (split.tp_size if tp else 1)  # each head's row sums to 1
    attn = (aq, ak, attn_lse_BSH.float().contiguous(), attn_scale * LOG2E, 1.0 / total_heads)
    dev = aq.device
    qi_all = key_range.query_index_BS.to(dev, torch.int64).expand(B, S).contiguous()
    ks_all = key_range.key_start_BS.to(dev, torch.int64).expand(B, S).contiguous()
    own = (split.rank if tp else 0) * n
    # This rank's rows (contiguous: the kernels index lz with the rows' stride).
    qi_BS, ks_BS = (t[:, own : own + n].contiguous() for t in (qi_all, ks_all))
    kl_BS = torch.zeros(B, n, dtype=torch.float32, device=dev)
    lz_BS = torch.empty(B, n, dtype=torch.float32, device=dev)
    dq, dk32, dw32 = _grad_buffers(q, k, want_grad)

    # The z / g buffer, and under TP one head-sum partial per slice after it.
    C = _block_rows(B, n, T * (1 + (slices if tp else 0)), CHUNK_ALIGN, buffer_bytes)
    buf = torch.empty(B * C * T * (1 + (slices if tp else 0)), dtype=torch.float32, device=dev)
    min_bn = 16  # smallest BLOCK_N of the g kernel's configs: sizes the KL partial buffer
    klp = torch.empty(B * C * triton.cdiv(T, min_bn), dtype=torch.float32, device=dev)
    for chunk in _slice_windows(qi_all, ks_all, slices, T, C):
        s0, s1 = chunk[:2]
        rows = s1 - s0
        # Under TP every rank takes part in every chunk's reduction (its peers need its heads).
        p_BCW = _reduced_head_sums(attn, (qi_all, ks_all), buf[B * C * T :], split, chunk, n) if tp else None  # fmt: skip
        lo = chunk[2][own // n]
        W = chunk[3][own // n] - lo + 1
        if W <= 0:  # no row of this chunk sees a key: KL 0 (kl_BS is zeroed), gradients 0
            if want_grad:
                dq[:, s0:s1] = 0
                dw32[:, s0:s1] = 0
            continue
        z_BCW = buf[: B * rows * W].view(B, rows, W)
        # Pass 1: the indexer logits of the chunk (masked -inf) and their per-row LSE.
        indexer_scores_block(q, k, w32, qi_BS, ks_BS, s0, rows, lo, W, z_BCW)
        _row_lse_kernel[(triton.cdiv(rows, LSE_ROWS), B)](
            z_BCW, qi_BS, ks_BS, lz_BS, rows, s0, lo, z_BCW.stride(0), z_BCW.stride(1),
            qi_BS.stride(0), ROWS=LSE_ROWS, BLOCK=LSE_BLOCK,
        )  # fmt: skip
        # Pass 2: main-attention head mean (fused, or read after the TP reduction), KL
        # partials, g = q - p (in place of z).
        klp_BCN = klp[: B * rows * triton.cdiv(W, min_bn)].view(B, rows, -1)
        klp_BCN.zero_()
        stage = 2 if tp else 0
        p_arg = z_BCW if p_BCW is None else p_BCW
        _g_launch(attn, (qi_BS, ks_BS), lz_BS, z_BCW, p_arg, klp_BCN, s0, lo, stage)
        kl_BS[:, s0:s1] = klp_BCN.sum(-1)
        if want_grad:
            _dense_grads(q, k, w32, (qi_BS, ks_BS), z_BCW, (dq, dk32, dw32), idx_scale, s0, lo)
    return kl_BS.sum(), dq, dk32, dw32


def _dense_grads(q, k, w32, rows_BS, g_BCW, grads, idx_scale, s0, lo) -> None:
    """dq, dw (stored) and dk (accumulated) of one chunk from its ``g = q - p`` buffer."""
    qi_BS, ks_BS = rows_BS
    dq, dk32, dw32 = grads
    B, rows, W = g_BCW.shape
    NI, D = q.shape[2:]
    T = k.shape[1]

    def grid_dq(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(rows * NI, meta["BLOCK_R"]), B)

    _dense_dq_kernel[grid_dq](
        q, k, w32, qi_BS, ks_BS, g_BCW, dq, dw32, idx_scale, NI, T, rows, s0, lo,
        q.stride(0), k.stride(0), k.stride(1), w32.stride(0), qi_BS.stride(0),
        g_BCW.stride(0), g_BCW.stride(1),
        D=D, INTERP=INTERPRET,
    )  # fmt: skip
    # Per QB-row block of the chunk: max query_index / min key_start (dk tile skipping).
    nqb = triton.cdiv(rows, QB_ROWS)
    pad = nqb * QB_ROWS - rows
    qi_c, ks_c = qi_BS[:, s0 : s0 + rows], ks_BS[:, s0 : s0 + rows]
    qmax = torch.nn.functional.pad(qi_c, (0, pad), value=-1).view(B, nqb, QB_ROWS).amax(-1)
    kmin = torch.nn.functional.pad(ks_c, (0, pad), value=2**30).view(B, nqb, QB_ROWS).amin(-1)
    qmax = qmax.to(torch.int32).contiguous()
    kmin = kmin.clamp_max(2**30).to(torch.int32).contiguous()
    n_kt = triton.cdiv(W, DK_BLOCK_N)
    dev = q.device
    n_sm = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
    # Split each key tile's row loop so the grid fills the GPU when W is short.
    n_split = max(1, min(16, triton.cdiv(2 * n_sm, n_kt * B)))
    _dense_dk_kernel[(n_kt, n_split, B)](
        q, k, w32, qi_BS, ks_BS, g_BCW, qmax, kmin, dk32, NI, rows, s0, lo, W, nqb,
        q.stride(0), k.stride(0), k.stride(1), w32.stride(0), qi_BS.stride(0),
        g_BCW.stride(0), g_BCW.stride(1), dk32.stride(0),
        D=D, QB=QB_ROWS, NQB_P2=triton.next_power_of_2(nqb), INTERP=INTERPRET,
        BLOCK_N=DK_BLOCK_N,
    )  # fmt: skip


# =============================================================================== autograd


@triton.jit
def _scale_cast_kernel(x_ptr, g_ptr, out_ptr, N, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    """``out = x * g`` with ``g`` a device scalar, one rounding to the output dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
    g = tl.load(g_ptr)
    tl.store(out_ptr + offs, cast(x * g, out_ptr.dtype.element_ty, INTERP), mask=offs < N)


def _scaled(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    n = x.numel()
    block = 1024 if INTERPRET else 4096
    g = grad.detach().float().reshape(1).contiguous()
    _scale_cast_kernel[(triton.cdiv(n, block),)](x, g, out, n, BLOCK=block, INTERP=INTERPRET)
    return out


class _EagerGradLoss(torch.autograd.Function):
    """Scalar loss whose indexer gradients the forward kernels already produced."""

    @staticmethod
    def forward(ctx, run, want_grad, q_BSID, k_BTD, w_BSI):  # type: ignore[override]
        loss, dq, dk32, dw32 = run(q_BSID, k_BTD, w_BSI, want_grad)
        if want_grad:
            ctx.save_for_backward(dq, dk32, dw32)
        ctx.dtypes = (k_BTD.dtype, w_BSI.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        dq, dk32, dw32 = ctx.saved_tensors
        need = ctx.needs_input_grad
        k_dtype, w_dtype = ctx.dtypes
        return (
            None,
            None,
            _scaled(dq, grad) if need[2] else None,
            (dk32 * grad).to(k_dtype) if need[3] else None,
            (dw32 * grad).to(w_dtype) if need[4] else None,
        )


def _wants_grad(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def sparse_distill_triton(
    attn_q_BSHD: torch.Tensor,
    attn_kv_BTD: torch.Tensor,
    attn_lse_BSH: torch.Tensor,
    topk_BSK: torch.Tensor,
    attn_scale: float,
    idx_q_BSID: torch.Tensor,
    idx_k_BTD: torch.Tensor,
    idx_w_BSI: torch.Tensor,
    idx_scale: float,
    split: RowReduction | None = None,
    buffer_bytes: int | None = None,
) -> torch.Tensor:
    """Sparse term ``sum_s KL(p_s || q_s)`` on the top-k slots of this rank's rows (fp32
    scalar, differentiable in the indexer's q, k, w).

    The attention tensors and ``topk_BSK`` hold every row (``split.slices`` slices) for this
    rank's heads; the indexer's ``q``/``w`` hold this rank's slice. ``split.reduce`` sums each
    chunk's per-slice head sums over the TP ranks (``None``: one process, all heads here)."""
    attn = (attn_q_BSHD.detach(), attn_kv_BTD.detach(), attn_lse_BSH.detach(), topk_BSK)

    def run(q, k, w, want_grad):
        return _sparse_forward(
            *attn, attn_scale, q, k, w, idx_scale, split, want_grad,
            buffer_bytes or SPARSE_BUFFER,
        )  # fmt: skip

    want = _wants_grad(idx_q_BSID, idx_k_BTD, idx_w_BSI)
    return _EagerGradLoss.apply(run, want, idx_q_BSID, idx_k_BTD, idx_w_BSI)


def dense_distill_triton(
    attn_q_BSHD: torch.Tensor,
    attn_k_BTHD: torch.Tensor,
    attn_lse_BSH: torch.Tensor,
    key_range: KeyRange | None,
    attn_scale: float,
    idx_q_BSID: torch.Tensor,
    idx_k_BTD: torch.Tensor,
    idx_w_BSI: torch.Tensor,
    idx_scale: float,
    split: RowReduction | None = None,
    buffer_bytes: int | None = None,
) -> torch.Tensor:
    """Dense term ``sum_s KL(p_s || q_s)`` over every key of each of this rank's rows' KeyRange.

    Rows as for :func:`sparse_distill_triton` (``key_range`` covers every row). With a TP
    ``split`` the head sums take a reduction between two kernels; without, one fused pass."""
    B, S = attn_q_BSHD.shape[:2]
    key_range = key_range or KeyRange.causal(B, S, attn_q_BSHD.device)
    attn = (attn_q_BSHD.detach(), attn_k_BTHD.detach(), attn_lse_BSH.detach(), key_range)

    def run(q, k, w, want_grad):
        return _dense_forward(
            *attn, attn_scale, q, k, w, idx_scale, split, want_grad, buffer_bytes or DENSE_BUFFER
        )

    want = _wants_grad(idx_q_BSID, idx_k_BTD, idx_w_BSI)
    return _EagerGradLoss.apply(run, want, idx_q_BSID, idx_k_BTD, idx_w_BSI)


def topk_head_probs_triton(
    attn_q_BSHD: torch.Tensor,
    attn_kv_BTD: torch.Tensor,
    attn_lse_BSH: torch.Tensor,
    topk_BSK: torch.Tensor,
    attn_scale: float,
) -> torch.Tensor:
    """``sum_h P_h[s, slot]`` ``[B, S, K]`` fp32 (unnormalised; tests and the TP split path)."""
    B, S, H, Da = attn_q_BSHD.shape
    da, db = split_pow2(Da)
    aq, akv = attn_q_BSHD.contiguous(), attn_kv_BTD.contiguous()
    lse = attn_lse_BSH.float().contiguous()
    idx = topk_BSK.to(torch.int32).contiguous()
    K = idx.shape[-1]
    p = torch.zeros(B, S, K, dtype=torch.float32, device=aq.device)
    bh = min(64, max(16, triton.next_power_of_2(H)))
    n_groups = triton.cdiv(H, bh)
    _topk_probs_kernel[(S, n_groups, B)](
        aq, akv, lse, idx, p, attn_scale * LOG2E, H, K, 0,
        *aq.stride()[:3], *akv.stride()[:2], *lse.stride()[:2], *idx.stride()[:2],
        *p.stride()[:2],
        DA=da, DB=db, BLOCK_H=bh, SCAN=_scan(K), ATOMIC=n_groups > 1, INTERP=INTERPRET,
    )  # fmt: skip
    return p
