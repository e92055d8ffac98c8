"""Sparse absorbed-MLA attention over per-query top-k indices (Triton, forward + backward).

Layout: query ``[B, S, H, D]`` (D = 576 = 512 latent + 64 rope), one shared latent key
``[B, T, D]`` whose first ``v_dim`` (= 512) channels are the value, indices ``[B, S, K]`` int32 of
global key positions, ``-1`` = empty slot. Packed documents and context parallel need nothing
here: the indexer already restricted the indices to each row's KeyRange.

Programs and their matrix tile
    Every kernel here runs one program per (block of ``BM`` query rows, group of ``BLOCK_H``
    heads) with an ``M = BM * BLOCK_H``-row matrix tile: row ``m`` is query row
    ``nb * BM + m // BLOCK_H`` and head ``m % BLOCK_H`` of the group. The heads of a query share
    its selected keys (MQA form), so the program gathers a tile of ``BLOCK_N`` latent rows once
    (row pointers from the entries, masked loads for empty slots) and uses it for all M rows: as K
    (all 576 dims, split 512 + 64 so both tiles are powers of two) and as V (the first 512 dims).

    * **Per-row** (``BM = 1``): the entries are the row's own indices. ``BLOCK_H = 64`` serves
      GLM-5 / DeepSeek-V3.2 at TP 1; at 16 heads (GLM-5 at TP 4, DeepSeek-V3.2 at TP 8) the tile
      has only 16 rows.
    * **Row-block** (``BM = 64 / BLOCK_H`` rows, e.g. 4 rows of 16 heads): the entries are the
      union of the rows' selections with a membership bit per row
      (:mod:`~indexcache_train.ops.sparse_plan`); a key a row did not select is masked out of that
      row's softmax. Shared keys are gathered once and added into dKV once per block instead of
      once per row, and the tiles have 64 rows. The price is the masked work: a block with
      union size U does ``BM * U`` row-key products for ``sum_r K_r`` useful ones, so the
      variant pays off only when the rows share keys. The plan's ``gain = sum_r K_r / U``
      (1: disjoint selections, BM: identical) decides, per call, with the thresholds
      :data:`ROW_BLOCK_MIN_GAIN_FWD` / :data:`ROW_BLOCK_MIN_GAIN_BWD` (measured, see their comments).

Algorithm
    Forward (FlashMLA-style): online softmax in base 2 over the entry tiles; the loop stops after
    the last valid entry (per row: a scan of the index row; row-block: the union size), so causal
    rows with fewer than K valid keys do no dead work. Outputs O (bf16) and LSE (fp32, natural
    log of the scaled logits; ``-inf`` and O = 0 for a row without a valid key).

    Backward: ``delta = rowsum(dO * O)`` in the program; per entry tile it recomputes
    ``P = exp(S - LSE)``, ``dP = dO V^T``, ``dS = P (dP - delta)``; dQ accumulates ``dS K`` in
    registers, dKV forms the tile's ``dS^T Q (+ P^T dO on the value dims)`` and scatter-adds it
    with fp32 atomics (vector ``atom.add.v4.f32``) into an fp32 ``[B, T, D]`` buffer (cast to the
    input dtype at the end). A tile with M <= :data:`FUSED_BWD_MAX_M` rows does both in one
    launch (its dQ accumulator is small); larger tiles use two launches (dQ, then dKV) that
    recompute S/P/dP (1.4x the matmul work) but keep one set of accumulators live: the fused
    64-row program spilled registers (sm_90: 255 regs + 1.3 KB stack; 29.8 ms vs 18.2 ms split,
    4K tokens, 64 heads, H100).

Accumulation and determinism
    bf16 tensor-core products, fp32 accumulators, softmax statistics and LSE in fp32; P and dS
    are rounded to bf16 before their products (FlashAttention-2 practice). By default dKV uses
    fp32 atomics: the order in which programs add into a key row is not fixed, so dKV is **not
    bitwise deterministic** run to run (differences at fp32 rounding, ~1e-7 relative, before the
    bf16 cast). ``deterministic=True`` (Megatron's ``deterministic_mode``) makes it so: each
    program stores its dKV rows into its own rows of a partial buffer (chunks of blocks, at most
    :data:`DETERMINISTIC_BUFFER` bytes), the chunk's keys are sorted stably, and
    :func:`_segment_sum_kernel` sums each key's rows in that fixed order and adds them into dKV
    (one owner per key per chunk, chunks in stream order). Its cost: every (program, entry) dKV row
    is written and read once more in fp32, plus a sort per chunk.

Known limits
    Absorbed layout only. ``v_dim`` must equal the larger power-of-two part of D (512 of 576).
    Heads are processed in groups of 64: H = 128 gathers each selected key twice. Row-block plans
    take key indices < 2^23 and treat each row's indices as a set (top-k never repeats a key).
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from indexcache_train.ops.kernel_dims import sparse_mla_dims, split_pow2
from indexcache_train.ops.sparse_plan import MEMBER_BITS, RowBlockPlan, build_row_block_plan
from indexcache_train.ops.triton_common import INTERPRET, LN2, LOG2E, cast, mma

# Row-block dispatch (see the module docstring), measured on an H100 at 32K tokens, 16 heads,
# k = 2048 (docs/benchmarks.md): the row-block time falls as 1 / gain (forward ~34 ms / gain,
# backward ~190 ms / gain) while the per-row kernels stay at ~15 ms forward and 84-109 ms
# backward (slower as rows share more keys: more atomic contention), so the crossovers are at
# a gain of ~2.25 forward and ~1.9 backward.
ROW_BLOCK_MIN_GAIN_FWD = 2.3
ROW_BLOCK_MIN_GAIN_BWD = 2.0
#: "auto": row-block where the gain clears the thresholds; "off": per-row only; "force":
#: row-block whenever the head count allows it (benchmarks and tests).
ROW_BLOCK_MODE = "auto"
#: The largest matrix tile (rows) whose backward runs as one fused launch.
FUSED_BWD_MAX_M = 32
#: Bytes of the partial-dKV buffer of the deterministic backward (it runs in chunks of blocks).
DETERMINISTIC_BUFFER = 1 << 29
TILE_ROWS = 64  # rows of a row-block tile: one Hopper warpgroup MMA

LN2_C: tl.constexpr = tl.constexpr(LN2)
LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)
MEMBER_BITS_C: tl.constexpr = tl.constexpr(MEMBER_BITS)
MEMBER_MASK_C: tl.constexpr = tl.constexpr((1 << MEMBER_BITS) - 1)


def _prune_by_rows(configs, named_args, **kwargs):
    """Keep the configs meant for this program's matrix-tile height (fewer compiles)."""
    m = kwargs["BLOCK_H"] * kwargs["BM"]
    kept = [c for c in configs if c.kwargs.get("MIN_M", 0) <= m <= c.kwargs.get("MAX_M", 1 << 30)]
    return kept or configs


def _cfg(block_n: int, warps: int, stages: int, min_m: int, max_m: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_N": block_n, "MIN_M": min_m, "MAX_M": max_m},
        num_warps=warps,
        num_stages=stages,
    )


def _fwd_configs() -> list[triton.Config]:
    if INTERPRET:
        return [_cfg(16, 4, 1, 0, 1 << 30)]
    small, big = (0, 32), (33, 1 << 30)
    # Few configs per tile height: every one is a compile on the GPU machine. Chosen from the
    # sm_90 resource report (scripts/bench/compile_report.py): no spills, <= 227 KB shared memory.
    return [
        _cfg(64, 4, 2, *small),
        _cfg(64, 8, 2, *small),
        _cfg(32, 8, 3, *big),
        _cfg(64, 8, 2, *big),
    ]


def _bwd_configs() -> list[triton.Config]:
    if INTERPRET:
        return [_cfg(16, 4, 1, 0, 1 << 30)]
    small, big = (0, 32), (33, 1 << 30)
    return [
        _cfg(16, 4, 1, *small),
        _cfg(32, 8, 1, *small),
        _cfg(32, 8, 1, *big),
        _cfg(64, 8, 1, *big),
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


@triton.jit
def _entry_count(ent_row, cnt_ptr, NE, PLAN: tl.constexpr, SCAN: tl.constexpr):
    """How many entries the program walks: the union size, or the row's last valid slot."""
    if PLAN:
        return tl.load(cnt_ptr)
    else:
        return _last_valid_slot(ent_row, NE, SCAN)


@triton.jit
def _entry_tile(ent_row, offs_n, NE, r_m, PLAN: tl.constexpr):
    """One tile of entries: ``(key rows [N] int64, valid [N], member [M, N])``.

    Per-row entries are key indices (every valid one belongs to the program's single row);
    row-block entries are ``key << MEMBER_BITS | bits`` and row ``r`` owns bit ``r``.
    """
    e = tl.load(ent_row + offs_n, mask=offs_n < NE, other=-1)
    valid = e >= 0
    if PLAN:
        key = e >> MEMBER_BITS_C
        bit = ((e[None, :] & MEMBER_MASK_C) >> r_m[:, None]) & 1
        member = valid[None, :] & (bit != 0)
    else:
        key = e
        member = valid[None, :] & (r_m[:, None] >= 0)
    return tl.where(valid, key, 0).to(tl.int64), valid, member


@triton.jit
def _put_rows(ptrs, x, mask, PARTIAL: tl.constexpr):
    """dKV rows: the deterministic mode stores them (one owner per partial row), else fp32
    atomics add them into the key's row."""
    if PARTIAL:
        tl.store(ptrs, x, mask=mask)
    else:
        tl.atomic_add(ptrs, x, mask=mask, sem="relaxed")


@triton.autotune(
    configs=_fwd_configs(),
    key=["DA", "DB", "BLOCK_H", "BM", "PLAN"],
    prune_configs_by={"early_config_prune": _prune_by_rows},
)
@triton.jit
def _sparse_mla_fwd_kernel(
    q_ptr,
    kv_ptr,
    ent_ptr,
    cnt_ptr,
    o_ptr,
    lse_ptr,
    scale_log2,
    S,
    H,
    NE,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kvb,
    stride_kvt,
    stride_eb,
    stride_en,
    stride_cb,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lb,
    stride_ls,
    DA: tl.constexpr,
    DB: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BM: tl.constexpr,
    PLAN: tl.constexpr,
    SCAN: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_M: tl.constexpr,
    MAX_M: tl.constexpr,
):
    M: tl.constexpr = BM * BLOCK_H
    nb = tl.program_id(0).to(tl.int64)
    hg = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = tl.arange(0, M)
    r_m = offs_m // BLOCK_H
    h_m = hg * BLOCK_H + offs_m % BLOCK_H
    s_m = nb * BM + r_m
    row_ok = (s_m < S) & (h_m < H)
    offs_a = tl.arange(0, DA)
    offs_b = DA + tl.arange(0, DB)

    ent_row = ent_ptr + b * stride_eb + nb * stride_en
    nv = _entry_count(ent_row, cnt_ptr + b * stride_cb + nb, NE, PLAN, SCAN)

    q_row = q_ptr + b * stride_qb + s_m[:, None] * stride_qs + h_m[:, None] * stride_qh
    qa = tl.load(q_row + offs_a[None, :], mask=row_ok[:, None], other=0.0)
    qb = tl.load(q_row + offs_b[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    acc = tl.zeros([M, DA], dtype=tl.float32)
    kv_base = kv_ptr + b * stride_kvb
    for n0 in range(0, nv, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        rows, valid, member = _entry_tile(ent_row, offs_n, NE, r_m, PLAN)
        # Gather: one latent row per entry; empty slots load zeros and are masked below.
        ka = tl.load(
            kv_base + rows[:, None] * stride_kvt + offs_a[None, :], mask=valid[:, None], other=0.0
        )
        kb = tl.load(
            kv_base + rows[:, None] * stride_kvt + offs_b[None, :], mask=valid[:, None], other=0.0
        )
        sc = mma(qa, tl.trans(ka), INTERP) + mma(qb, tl.trans(kb), INTERP)
        sc = tl.where(member, sc * scale_log2, float("-inf"))
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
    o_ptrs = o_ptr + b * stride_ob + s_m[:, None] * stride_os + h_m[:, None] * stride_oh
    tl.store(
        o_ptrs + offs_a[None, :], cast(out, o_ptr.dtype.element_ty, INTERP), mask=row_ok[:, None]
    )
    tl.store(lse_ptr + b * stride_lb + s_m * stride_ls + h_m, lse, mask=row_ok)


@triton.autotune(
    configs=_bwd_configs(),
    key=["DA", "DB", "BLOCK_H", "BM", "PLAN", "DO_DQ", "DO_DKV", "PARTIAL"],
    prune_configs_by={"early_config_prune": _prune_by_rows},
    reset_to_zero=["dkv_ptr"],
)
@triton.jit
def _sparse_mla_bwd_kernel(
    q_ptr,
    kv_ptr,
    ent_ptr,
    cnt_ptr,
    o_ptr,
    do_ptr,
    lse_ptr,
    dq_ptr,
    dkv_ptr,
    part_ptr,
    scale,
    scale_log2,
    S,
    H,
    NE,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kvb,
    stride_kvt,
    stride_eb,
    stride_en,
    stride_cb,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lb,
    stride_ls,
    stride_dkb,
    stride_dkt,
    stride_pg,
    stride_pn,
    DA: tl.constexpr,
    DB: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BM: tl.constexpr,
    PLAN: tl.constexpr,
    SCAN: tl.constexpr,
    DO_DQ: tl.constexpr,
    DO_DKV: tl.constexpr,
    PARTIAL: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_M: tl.constexpr,
    MAX_M: tl.constexpr,
):
    """Backward for one program (see the module docstring); ``DO_DQ`` / ``DO_DKV`` pick outputs.

    The 512 latent dims are handled as two 256-wide halves so the live dKV tile stays at
    ``[BLOCK_N, 256]`` fp32. ``PARTIAL`` (the deterministic mode) stores each entry's dKV row to
    its own row of a partial buffer ``[head groups, blocks, entries, D]`` instead of adding it
    into dKV; :func:`_segment_sum_kernel` then reduces the rows of each key in a fixed order.
    """
    M: tl.constexpr = BM * BLOCK_H
    DH: tl.constexpr = DA // 2
    nb = tl.program_id(0).to(tl.int64)
    hg = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = tl.arange(0, M)
    r_m = offs_m // BLOCK_H
    h_m = hg * BLOCK_H + offs_m % BLOCK_H
    s_m = nb * BM + r_m
    row_ok = (s_m < S) & (h_m < H)
    offs_0 = tl.arange(0, DH)
    offs_1 = DH + tl.arange(0, DH)
    offs_r = DA + tl.arange(0, DB)

    ent_row = ent_ptr + b * stride_eb + nb * stride_en
    nv = _entry_count(ent_row, cnt_ptr + b * stride_cb + nb, NE, PLAN, SCAN)

    row_q = b * stride_qb + s_m[:, None] * stride_qs + h_m[:, None] * stride_qh
    q0 = tl.load(q_ptr + row_q + offs_0[None, :], mask=row_ok[:, None], other=0.0)
    q1 = tl.load(q_ptr + row_q + offs_1[None, :], mask=row_ok[:, None], other=0.0)
    qr = tl.load(q_ptr + row_q + offs_r[None, :], mask=row_ok[:, None], other=0.0)
    row_o = b * stride_ob + s_m[:, None] * stride_os + h_m[:, None] * stride_oh
    do0 = tl.load(do_ptr + row_o + offs_0[None, :], mask=row_ok[:, None], other=0.0)
    do1 = tl.load(do_ptr + row_o + offs_1[None, :], mask=row_ok[:, None], other=0.0)
    o0 = tl.load(o_ptr + row_o + offs_0[None, :], mask=row_ok[:, None], other=0.0)
    o1 = tl.load(o_ptr + row_o + offs_1[None, :], mask=row_ok[:, None], other=0.0)
    # delta = rowsum(dO * O) in fp32, per (row, head) (FlashAttention-2's D term).
    delta = tl.sum(do0.to(tl.float32) * o0.to(tl.float32), 1) + tl.sum(
        do1.to(tl.float32) * o1.to(tl.float32), 1
    )
    lse_ptrs = lse_ptr + b * stride_lb + s_m * stride_ls + h_m
    lse2 = tl.load(lse_ptrs, mask=row_ok, other=0.0) * LOG2E_C

    dq0 = tl.zeros([M, DH], dtype=tl.float32)
    dq1 = tl.zeros([M, DH], dtype=tl.float32)
    dqr = tl.zeros([M, DB], dtype=tl.float32)
    kv_base = kv_ptr + b * stride_kvb
    dkv_base = dkv_ptr + b * stride_dkb
    for n0 in range(0, nv, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        rows, valid, member = _entry_tile(ent_row, offs_n, NE, r_m, PLAN)
        k_rows = kv_base + rows[:, None] * stride_kvt
        k0 = tl.load(k_rows + offs_0[None, :], mask=valid[:, None], other=0.0)
        k1 = tl.load(k_rows + offs_1[None, :], mask=valid[:, None], other=0.0)
        kr = tl.load(k_rows + offs_r[None, :], mask=valid[:, None], other=0.0)
        sc = mma(q0, tl.trans(k0), INTERP) + mma(q1, tl.trans(k1), INTERP)
        sc += mma(qr, tl.trans(kr), INTERP)
        # Padded rows/heads, empty slots and keys a row did not select contribute nothing
        # (the LSE of a padded row is a dummy 0).
        ok = row_ok[:, None] & member
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
            amask = valid[:, None]
            if PARTIAL:
                d_rows = part_ptr + hg * stride_pg + nb * stride_pn + offs_n[:, None] * (DA + DB)
            else:
                d_rows = dkv_base + rows[:, None] * stride_dkt
            # One 256-wide half at a time keeps the live dKV tile at [BLOCK_N, 256] fp32.
            dk0 = mma(ds_t, q0, INTERP) + mma(pb_t, do0, INTERP)
            _put_rows(d_rows + offs_0[None, :], dk0, amask, PARTIAL)
            dk1 = mma(ds_t, q1, INTERP) + mma(pb_t, do1, INTERP)
            _put_rows(d_rows + offs_1[None, :], dk1, amask, PARTIAL)
            dkr = mma(ds_t, qr, INTERP)
            _put_rows(d_rows + offs_r[None, :], dkr, amask, PARTIAL)

    if DO_DQ:
        dq_row = dq_ptr + row_q
        dq_ty = dq_ptr.dtype.element_ty
        tl.store(dq_row + offs_0[None, :], cast(dq0, dq_ty, INTERP), mask=row_ok[:, None])
        tl.store(dq_row + offs_1[None, :], cast(dq1, dq_ty, INTERP), mask=row_ok[:, None])
        tl.store(dq_row + offs_r[None, :], cast(dqr, dq_ty, INTERP), mask=row_ok[:, None])


# ------------------------------------------------------------------------------- host side


def _scan(K: int) -> int:
    return min(2048, max(16, triton.next_power_of_2(K)))


def _block_h(H: int) -> int:
    return min(64, max(16, triton.next_power_of_2(H)))


def rows_per_block(H: int) -> int:
    """Query rows a row-block program serves at ``H`` heads (1: no row-block variant)."""
    return max(1, min(MEMBER_BITS, TILE_ROWS // _block_h(H)))


# Plans are keyed by the index tensor: the Shared layers of a group attend the very top-k tensor
# their Full layer produced, so a group builds one plan (one host sync) for all its layers.
_PLAN_CACHE: dict[int, tuple[weakref.ref, int, int, RowBlockPlan]] = {}
_PLAN_CACHE_SIZE = 4


def row_block_plan(idx_BSK: torch.Tensor, H: int) -> RowBlockPlan | None:
    """The row-block plan for ``H`` heads (cached per index tensor), or ``None`` where the head
    count or :data:`ROW_BLOCK_MODE` rules the variant out."""
    bm = rows_per_block(H)
    if bm < 2 or ROW_BLOCK_MODE == "off":
        return None
    hit = _PLAN_CACHE.get(id(idx_BSK))
    if hit is not None and hit[0]() is idx_BSK and hit[1] == idx_BSK._version and hit[2] == bm:
        return hit[3]
    plan = build_row_block_plan(idx_BSK, bm)
    while len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
        _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
    _PLAN_CACHE[id(idx_BSK)] = (weakref.ref(idx_BSK), idx_BSK._version, bm, plan)
    return plan


def _use_plan(plan: RowBlockPlan | None, min_gain: float) -> bool:
    if plan is None:
        return False
    return ROW_BLOCK_MODE == "force" or plan.gain >= min_gain


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


def _entries(idx_BSK: torch.Tensor, plan: RowBlockPlan | None, H: int):
    """Launch geometry and entry arguments: ``(grid, BLOCK_H, BM, entries, count, NE, strides)``."""
    B, S, K = idx_BSK.shape
    bh = _block_h(H)
    if plan is None:
        grid = (S, triton.cdiv(H, bh), B)
        return grid, bh, 1, idx_BSK, idx_BSK, K, (*idx_BSK.stride()[:2], 0)
    e, c = plan.entries_BNU, plan.count_BN
    grid = (plan.num_blocks, triton.cdiv(H, bh), B)
    return grid, bh, plan.rows_per_block, e, c, e.shape[-1], (*e.stride()[:2], c.stride(0))


def _fwd(q_BSHD, kv_BTD, idx_BSK, scale, v_dim, plan: RowBlockPlan | None = None):
    B, S, H, _ = q_BSHD.shape
    da, db = _check(q_BSHD, kv_BTD, idx_BSK, v_dim)
    out = torch.empty(B, S, H, da, dtype=q_BSHD.dtype, device=q_BSHD.device)
    lse = torch.empty(B, S, H, dtype=torch.float32, device=q_BSHD.device)
    grid, bh, bm, ent, cnt, ne, e_strides = _entries(idx_BSK, plan, H)
    _sparse_mla_fwd_kernel[grid](
        q_BSHD, kv_BTD, ent, cnt, out, lse, scale * LOG2E, S, H, ne,
        *q_BSHD.stride()[:3], *kv_BTD.stride()[:2], *e_strides, *out.stride()[:3],
        *lse.stride()[:2],
        DA=da, DB=db, BLOCK_H=bh, BM=bm, PLAN=plan is not None, SCAN=_scan(idx_BSK.shape[-1]),
        INTERP=INTERPRET,
    )  # fmt: skip
    return out, lse


def bwd_launches(m_rows: int) -> tuple[tuple[bool, bool], ...]:
    """``(DO_DQ, DO_DKV)`` per launch for a program with ``m_rows`` matrix rows."""
    if m_rows <= FUSED_BWD_MAX_M:
        return ((True, True),)
    # dQ-only first: the dQ launch's autotuning zeroes dkv32 (reset_to_zero) before dKV runs.
    return ((True, False), (False, True))


@triton.jit
def _segment_sum_kernel(
    part_ptr, order_ptr, keys_ptr, dkv_ptr, N, stride_dkt, DA: tl.constexpr, DB: tl.constexpr
):
    """Deterministic dKV reduction: program ``i`` owns the run of equal sorted keys starting at
    ``i`` (other programs exit), sums its partial rows in their stable sorted order and adds the
    sum into the key's dKV row. Each key is owned by one program per chunk and chunks run one
    after another on the stream, so no two writers race and the order is fixed."""
    i = tl.program_id(0)
    key = tl.load(keys_ptr + i)
    prev = tl.load(keys_ptr + i - 1, mask=i > 0, other=-2)
    if (key >= 0) & (key != prev):
        offs_a = tl.arange(0, DA)
        offs_b = DA + tl.arange(0, DB)
        acc_a = tl.zeros([DA], dtype=tl.float32)
        acc_b = tl.zeros([DB], dtype=tl.float32)
        j = i
        cur = key
        while cur == key:
            row = part_ptr + tl.load(order_ptr + j).to(tl.int64) * (DA + DB)
            acc_a += tl.load(row + offs_a)
            acc_b += tl.load(row + offs_b)
            j += 1
            cur = tl.load(keys_ptr + j, mask=j < N, other=-1)
        d_row = dkv_ptr + key.to(tl.int64) * stride_dkt
        tl.store(d_row + offs_a, tl.load(d_row + offs_a) + acc_a)
        tl.store(d_row + offs_b, tl.load(d_row + offs_b) + acc_b)


def _bwd(
    dout,
    q_BSHD,
    kv_BTD,
    idx_BSK,
    out,
    lse,
    scale,
    v_dim,
    plan: RowBlockPlan | None = None,
    deterministic: bool = False,
):
    _, S, H, _ = q_BSHD.shape
    da, db = _check(q_BSHD, kv_BTD, idx_BSK, v_dim)
    dout = dout.contiguous()
    dq = torch.empty_like(q_BSHD)
    dkv32 = torch.zeros(kv_BTD.shape, dtype=torch.float32, device=kv_BTD.device)
    grid, bh, bm, ent, cnt, ne, _ = _entries(idx_BSK, plan, H)
    consts = dict(
        DA=da, DB=db, BLOCK_H=bh, BM=bm, PLAN=plan is not None, SCAN=_scan(idx_BSK.shape[-1]),
        INTERP=INTERPRET,
    )  # fmt: skip

    def launch(grid, b_sl, r_sl, ent, cnt, part, p_strides, rows, do_dq, do_dkv, partial):
        """One backward launch over batches ``b_sl`` and query rows ``r_sl`` (views)."""
        q, kv, o, do = q_BSHD[b_sl, r_sl], kv_BTD[b_sl], out[b_sl, r_sl], dout[b_sl, r_sl]
        lse_, dq_, dkv_ = lse[b_sl, r_sl], dq[b_sl, r_sl], dkv32[b_sl]
        _sparse_mla_bwd_kernel[grid](
            q, kv, ent, cnt, o, do, lse_, dq_, dkv_, part, scale, scale * LOG2E, rows, H, ne,
            *q.stride()[:3], *kv.stride()[:2], *ent.stride()[:2],
            cnt.stride(0) if plan is not None else 0, *o.stride()[:3], *lse_.stride()[:2],
            *dkv_.stride()[:2], *p_strides,
            DO_DQ=do_dq, DO_DKV=do_dkv, PARTIAL=partial, **consts,
        )  # fmt: skip

    launches = bwd_launches(bh * bm)
    everything = (slice(None), slice(None))
    if not deterministic:
        for do_dq, do_dkv in launches:
            launch(grid, *everything, ent, cnt, dkv32, (0, 0), S, do_dq, do_dkv, False)
        return dq, dkv32.to(kv_BTD.dtype)
    # Deterministic: dQ needs no change (each program owns its rows); dKV rows go to a partial
    # buffer chunk by chunk of blocks and are reduced per key in a fixed (stable-sorted) order.
    if len(launches) == 2:
        launch(grid, *everything, ent, cnt, dkv32, (0, 0), S, True, False, False)
    n_blocks, n_hg = grid[0], grid[1]
    D = da + db
    step = max(1, DETERMINISTIC_BUFFER // (n_hg * ne * D * 4))
    part = torch.empty(n_hg, min(step, n_blocks), ne, D, dtype=torch.float32, device=q_BSHD.device)
    keys_c = torch.empty(n_hg, part.shape[1], ne, dtype=torch.int32, device=q_BSHD.device)
    for b in range(q_BSHD.shape[0]):
        for nb0 in range(0, n_blocks, step):
            nb1 = min(n_blocks, nb0 + step)
            b_sl, r_sl = slice(b, b + 1), slice(nb0 * bm, min(S, nb1 * bm))
            ent_c = ent[b_sl, nb0:nb1]
            cnt_c = cnt[b_sl, nb0:nb1] if plan is not None else ent_c
            rows = r_sl.stop - r_sl.start
            fused = len(launches) == 1
            launch(
                (nb1 - nb0, n_hg, 1), b_sl, r_sl, ent_c, cnt_c, part, part.stride()[:2], rows,
                fused, True, True,
            )  # fmt: skip
            e = ent_c[0]
            keys = torch.where(e >= 0, e >> MEMBER_BITS if plan is not None else e, -1)
            keys_c.fill_(-1)
            keys_c[:, : nb1 - nb0] = keys
            sorted_keys, order = torch.sort(keys_c.view(-1), stable=True)
            _segment_sum_kernel[(keys_c.numel(),)](
                part, order, sorted_keys, dkv32[b], keys_c.numel(), dkv32.stride(1), DA=da, DB=db
            )
    return dq, dkv32.to(kv_BTD.dtype)


class _TritonSparseMLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BSHD, kv_BTD, idx_BSK, scale, v_dim, deterministic):  # type: ignore[override]
        q_BSHD, kv_BTD = q_BSHD.contiguous(), kv_BTD.contiguous()
        idx_BSK = idx_BSK.to(torch.int32).contiguous()
        plan = row_block_plan(idx_BSK, q_BSHD.shape[2])
        fwd_plan = plan if _use_plan(plan, ROW_BLOCK_MIN_GAIN_FWD) else None
        out, lse = _fwd(q_BSHD, kv_BTD, idx_BSK, scale, v_dim, fwd_plan)
        ctx.bwd_plan = plan if _use_plan(plan, ROW_BLOCK_MIN_GAIN_BWD) else None
        ctx.save_for_backward(q_BSHD, kv_BTD, idx_BSK, out, lse)
        ctx.scale, ctx.v_dim, ctx.deterministic = scale, v_dim, deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        q_BSHD, kv_BTD, idx_BSK, out, lse = ctx.saved_tensors
        dq, dkv = _bwd(
            dout, q_BSHD, kv_BTD, idx_BSK, out, lse, ctx.scale, ctx.v_dim, ctx.bwd_plan,
            ctx.deterministic,
        )  # fmt: skip
        return dq, dkv, None, None, None, None


def sparse_mla_triton(
    q_BSHD: torch.Tensor,
    kv_BTD: torch.Tensor,
    idx_BSK: torch.Tensor,
    softmax_scale: float,
    v_dim: int,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse absorbed-MLA attention ``(out_BSHV, lse_BSH)`` with the Triton kernels.

    ``deterministic``: a bitwise run-to-run reproducible backward (dKV reduced per key in a fixed
    order instead of by fp32 atomics; see the module docstring for its cost).
    """
    return _TritonSparseMLA.apply(q_BSHD, kv_BTD, idx_BSK, softmax_scale, v_dim, deterministic)
