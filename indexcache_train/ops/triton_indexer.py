"""Lightning-indexer scores + top-k on the GPU (Triton scoring kernel, torch top-k per query block).

Algorithm
    Query rows are processed in blocks of ``C`` rows (``C`` chosen so one ``[B, C, W]`` fp32
    score buffer stays under ``buffer_bytes``; ``W`` = the block's key window). For each block:

    1. ``_indexer_scores_kernel`` computes ``I[b, s, t] = sum_i w[b,s,i] * scale * relu(q[b,s,i] . k[b,t])``
       for a ``BLOCK_M x BLOCK_N`` (query x key) tile per program: the key tile is loaded once and
       kept in shared memory while the loop over the ``I`` indexer heads streams one ``[BLOCK_M, D]``
       query tile per head through the tensor cores (bf16 in, fp32 accumulate), applies ReLU and
       adds ``w * scale`` times it into an fp32 register accumulator (``scale > 0`` is folded into
       ``w``: ``relu(scale*x) = scale*relu(x)``). The KeyRange mask (``key_start <= t <= query_index``)
       is applied in the epilogue; tiles outside every row's range skip the head loop and only
       write ``-inf``.
    2. ``torch.topk(K, sorted=True)`` over the block's key window ``[lo, hi]`` (``lo`` = smallest
       key_start, ``hi`` = largest query_index of the block, so early causal blocks and packed
       documents do not pay for keys no row can see); ``-inf`` winners become ``-1``, so rows with
       fewer than K valid keys get ``-1`` in their trailing slots, exactly like the reference.
       Measured choice: the exact Triton radix select below (``SELECT = "radix"``: 8-bit radix
       passes on the order-preserving uint32 image of the scores, then one compaction pass) was
       2.8x slower than torch.topk on the H100 (``tl.histogram`` lowers to per-bit warp ballots),
       so torch.topk stays the default; the selection is still 45-65% of the indexer's time.

    Memory is ``O(C * T)`` for the score buffer plus the ``[B, S, K]`` output: linear in sequence
    length, never ``[S, T]`` or ``[S, I, T]``.

Accumulation
    fp32 for the dot products and the head sum (same as the reference; only the summation order
    differs, so top-k sets differ only at near-ties with the k-th score).

Known limits
    Forward only (indices are not differentiable). Index head dim must be a power of two (128 in
    GLM-5 / DeepSeek-V3.2). ``softmax_scale`` must be positive. One host sync per call when a
    KeyRange is given (the per-block key windows are read back once); none for plain causal.
    ``-0.0`` ranks below ``+0.0`` in the radix order (torch.topk treats them equal).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from indexcache_train.ops.kernel_dims import indexer_dims
from indexcache_train.ops.masking import KeyRange
from indexcache_train.ops.triton_common import INTERPRET, mma

INVALID_INDEX = -1
# "torch": torch.topk on each block (default: measured faster); "radix": the Triton radix select
# below (exact; 2.8x slower than torch.topk at 128K on the H100 because tl.histogram lowers to
# per-bit warp ballots: 484 vs 270 ms end to end, 32 heads, k=2048).
SELECT = "torch"
ROW_ALIGN = 128  # query blocks hold a multiple of this many rows (the largest BLOCK_M)


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=1)]
    # Register/shared-memory use of each checked with scripts/bench/compile_report.py (no spills).
    return [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 256}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    ]


# The score buffer is fully rewritten by every launch, so autotuning reruns are harmless.
@triton.autotune(configs=_configs(), key=["NUM_HEADS", "HEAD_DIM"])
@triton.jit
def _indexer_scores_kernel(
    q_ptr,
    k_ptr,
    w_ptr,
    qi_ptr,
    ks_ptr,
    out_ptr,
    rows,
    T,
    win_lo,
    win_len,
    row0,
    stride_qb,
    stride_qs,
    stride_qi,
    stride_kb,
    stride_kt,
    stride_wb,
    stride_ws,
    stride_rb,
    stride_ob,
    stride_os,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows inside this query block
    row_ok = offs_m < rows
    grow = row0 + offs_m  # global query row
    qi = tl.load(qi_ptr + b * stride_rb + grow, mask=row_ok, other=-1)
    ks = tl.load(ks_ptr + b * stride_rb + grow, mask=row_ok, other=2**62)

    offs_w = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # column inside the window
    t = win_lo + offs_w  # global key position
    col_ok = offs_w < win_len
    n_first = win_lo + pid_n * BLOCK_N

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Skip the head loop when no row of the tile can see any key of it (causal upper triangle,
    # other documents): those scores are -inf anyway.
    if (n_first <= tl.max(qi, axis=0)) & (n_first + BLOCK_N > tl.min(ks, axis=0)):
        offs_d = tl.arange(0, HEAD_DIM)
        k_tile = tl.load(
            k_ptr + b * stride_kb + t.to(tl.int64)[:, None] * stride_kt + offs_d[None, :],
            mask=(t < T)[:, None],
            other=0.0,
        )
        k_t = tl.trans(k_tile)  # [D, BLOCK_N], reused by every head
        q_base = q_ptr + b * stride_qb + grow.to(tl.int64)[:, None] * stride_qs + offs_d[None, :]
        w_base = w_ptr + b * stride_wb + grow * stride_ws
        for h in range(NUM_HEADS):
            q_h = tl.load(q_base + h * stride_qi, mask=row_ok[:, None], other=0.0)
            w_h = tl.load(w_base + h, mask=row_ok, other=0.0)  # fp32, softmax scale folded in
            acc += tl.maximum(mma(q_h, k_t, INTERP), 0.0) * w_h[:, None]

    valid = (t[None, :] >= ks[:, None]) & (t[None, :] <= qi[:, None])
    acc = tl.where(valid, acc, float("-inf"))
    out_ptrs = out_ptr + b * stride_ob + offs_m.to(tl.int64)[:, None] * stride_os + offs_w[None, :]
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _ordered_u32(x):
    """fp32 -> uint32 with the same order (-inf smallest): flip all bits of negatives, the sign of others."""
    i = x.to(tl.int32, bitcast=True)
    key = i ^ ((i >> 31) & 0x7FFFFFFF)  # signed, order-preserving
    return (key ^ -2147483648).to(tl.uint32, bitcast=True)


@triton.jit
def _radix_topk_kernel(
    s_ptr,
    out_ptr,
    W,
    K,
    lo,
    stride_sb,
    stride_sr,
    stride_ob,
    stride_or,
    BLOCK: tl.constexpr,
):
    """Exact top-K of one score row (``W`` fp32 values) by 8-bit radix select, unsorted output.

    Pass 1 histograms the top byte of the order-preserving key and counts finite scores; if more
    than K are finite, passes 2-4 refine the K-th largest key byte by byte among the rows'
    elements that share the bytes found so far (4 histogram passes + 1 write pass = 5 reads of
    the row, all coalesced). The write pass stores, in key order, every index whose key is above
    the K-th key and then the first ``need`` indices equal to it (ties broken by position).
    ``-inf`` scores are never written; the caller pre-fills the row with -1.
    """
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    row = s_ptr + b * stride_sb + r * stride_sr
    out = out_ptr + b * stride_ob + r * stride_or
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)

    hist = tl.zeros([256], dtype=tl.int32)
    n_valid = 0
    for t0 in range(0, W, BLOCK):
        inb = t0 + offs < W
        x = tl.load(row + t0 + offs, mask=inb, other=float("-inf"))
        u = _ordered_u32(x)
        hist += tl.histogram((u >> 24).to(tl.int32), 256, mask=inb)
        n_valid += tl.sum((x > float("-inf")).to(tl.int32), axis=0)

    thr = _ordered_u32(tl.full([], float("-inf"), tl.float32))
    need = 0
    n_gt = n_valid
    if n_valid > K:
        remaining = K
        prefix = tl.zeros([], dtype=tl.uint32)
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            if p > 0:
                hist = tl.zeros([256], dtype=tl.int32)
                for t0 in range(0, W, BLOCK):
                    inb = t0 + offs < W
                    x = tl.load(row + t0 + offs, mask=inb, other=float("-inf"))
                    u = _ordered_u32(x)
                    same = (u >> (shift + 8)) == (prefix >> (shift + 8))
                    digit = ((u >> shift) & 255).to(tl.int32)
                    hist += tl.histogram(digit, 256, mask=inb & same)
            # Count of candidates whose digit is >= d; the K-th largest lies in the largest such d.
            suffix = tl.sum(hist, axis=0) - tl.cumsum(hist, 0) + hist
            d_star = tl.max(tl.where(suffix >= remaining, bins, -1), axis=0)
            remaining -= tl.sum(tl.where(bins > d_star, hist, 0), axis=0)
            prefix = prefix | (d_star.to(tl.uint32) << shift)
        thr = prefix
        need = remaining  # how many keys equal to the K-th key to take
        n_gt = K - remaining

    c_gt = 0
    c_eq = 0
    for t0 in range(0, W, BLOCK):
        inb = t0 + offs < W
        x = tl.load(row + t0 + offs, mask=inb, other=float("-inf"))
        u = _ordered_u32(x)
        gt = (u > thr) & inb
        eq = (u == thr) & inb & (need > 0)
        gt_i = gt.to(tl.int32)
        eq_i = eq.to(tl.int32)
        pos_gt = c_gt + tl.cumsum(gt_i, 0) - 1
        rank_eq = c_eq + tl.cumsum(eq_i, 0) - 1
        take_eq = eq & (rank_eq < need)
        idx = (lo + t0 + offs).to(tl.int32)
        tl.store(out + pos_gt, idx, mask=gt)
        tl.store(out + n_gt + rank_eq, idx, mask=take_eq)
        c_gt += tl.sum(gt_i, axis=0)
        c_eq += tl.sum(eq_i, axis=0)


def radix_topk_block(scores_BCW: torch.Tensor, K: int, lo: int, out_BCK: torch.Tensor) -> None:
    """Top-``K`` indices (``+ lo``) of each row of ``scores_BCW`` into ``out_BCK`` (pre-filled -1)."""
    B, C, W = scores_BCW.shape
    _radix_topk_kernel[(C, B)](
        scores_BCW, out_BCK, W, K, lo,
        scores_BCW.stride(0), scores_BCW.stride(1), out_BCK.stride(0), out_BCK.stride(1),
        BLOCK=1024 if INTERPRET else 4096,
        num_warps=4 if INTERPRET else 8,
    )  # fmt: skip


def _block_rows(B: int, S: int, T: int, block_m: int, buffer_bytes: int) -> int:
    rows = buffer_bytes // max(1, B * T * 4)
    rows = max(block_m, (rows // block_m) * block_m)
    return min(rows, triton.cdiv(S, block_m) * block_m)


def indexer_scores_block(
    q_BSID: torch.Tensor,
    k_BTD: torch.Tensor,
    w32_BSI: torch.Tensor,
    qi_BS: torch.Tensor,
    ks_BS: torch.Tensor,
    row0: int,
    rows: int,
    win_lo: int,
    win_len: int,
    out_BCW: torch.Tensor,
) -> torch.Tensor:
    """Masked scores of query rows ``[row0, row0+rows)`` against keys ``[win_lo, win_lo+win_len)``.

    ``w32_BSI`` is fp32 with the softmax scale already folded in. Writes ``out_BCW[:, :rows, :win_len]``.
    """
    B, _, n_heads, D = q_BSID.shape
    T = k_BTD.shape[1]

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(win_len, meta["BLOCK_N"]), triton.cdiv(rows, meta["BLOCK_M"]), B)

    _indexer_scores_kernel[grid](
        q_BSID, k_BTD, w32_BSI, qi_BS, ks_BS, out_BCW, rows, T, win_lo, win_len, row0,
        q_BSID.stride(0), q_BSID.stride(1), q_BSID.stride(2), k_BTD.stride(0), k_BTD.stride(1),
        w32_BSI.stride(0), w32_BSI.stride(1), qi_BS.stride(0), out_BCW.stride(0), out_BCW.stride(1),
        NUM_HEADS=n_heads, HEAD_DIM=D, INTERP=INTERPRET,
    )  # fmt: skip
    return out_BCW


def _prepare(
    q_BSID: torch.Tensor,
    k_BTD: torch.Tensor,
    w_BSI: torch.Tensor,
    softmax_scale: float,
    key_range: KeyRange | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if softmax_scale <= 0:
        raise ValueError("indexer kernel folds the scale into relu(): softmax_scale must be > 0")
    B, S, _, D = q_BSID.shape
    if reason := indexer_dims(D):
        raise ValueError(reason)
    if k_BTD.shape[-1] != D:
        raise ValueError("q and k head dims differ")
    q_BSID = q_BSID.contiguous()
    k_BTD = k_BTD.contiguous()
    w32_BSI = (w_BSI.float() * softmax_scale).contiguous()
    key_range = key_range or KeyRange.causal(B, S, q_BSID.device)
    qi_BS = key_range.query_index_BS.to(torch.int64).expand(B, S).contiguous()
    ks_BS = key_range.key_start_BS.to(torch.int64).expand(B, S).contiguous()
    return q_BSID, k_BTD, w32_BSI, qi_BS, ks_BS


def _windows(
    qi_BS: torch.Tensor, ks_BS: torch.Tensor, S: int, T: int, C: int, causal: bool
) -> list[tuple[int, int, int, int]]:
    """``(row0, row1, lo, hi)`` per query block: the key window ``[lo, hi]`` any row can see."""
    blocks = [(s0, min(s0 + C, S)) for s0 in range(0, S, C)]
    if causal:
        return [(s0, s1, 0, min(s1 - 1, T - 1)) for s0, s1 in blocks]
    n = len(blocks)
    pad = n * C - S
    qi = torch.nn.functional.pad(qi_BS, (0, pad), value=-1).view(-1, n, C).amax(dim=(0, 2))
    ks = torch.nn.functional.pad(ks_BS, (0, pad), value=2**62).view(-1, n, C).amin(dim=(0, 2))
    bounds = torch.stack([ks.clamp(0, T), qi.clamp(-1, T - 1)], 1).tolist()  # one host sync
    return [(s0, s1, lo, hi) for (s0, s1), (lo, hi) in zip(blocks, bounds)]


def score_blocks(
    q_BSID: torch.Tensor,
    k_BTD: torch.Tensor,
    w_BSI: torch.Tensor,
    softmax_scale: float,
    key_range: KeyRange | None,
    buffer_bytes: int = 1 << 30,
) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """Yield ``(row0, row1, lo, scores_BCW)`` per query block; the buffer is reused between blocks."""
    causal = key_range is None
    q_BSID, k_BTD, w32_BSI, qi_BS, ks_BS = _prepare(q_BSID, k_BTD, w_BSI, softmax_scale, key_range)
    B, S = q_BSID.shape[:2]
    T = k_BTD.shape[1]
    C = _block_rows(B, S, T, ROW_ALIGN, buffer_bytes)
    buf = torch.empty(B * C * T, dtype=torch.float32, device=q_BSID.device)
    for s0, s1, lo, hi in _windows(qi_BS, ks_BS, S, T, C, causal):
        W = hi - lo + 1
        if W <= 0:
            continue  # no row of this block sees any key: its slots stay -1
        rows = s1 - s0
        scores_BCW = buf[: B * rows * W].view(B, rows, W)
        indexer_scores_block(q_BSID, k_BTD, w32_BSI, qi_BS, ks_BS, s0, rows, lo, W, scores_BCW)
        yield s0, s1, lo, scores_BCW


def _sort_by_score(scores_BCW: torch.Tensor, idx_BCK: torch.Tensor, lo: int) -> None:
    """Reorder each row's slots by descending score in place (``-1`` slots stay last)."""
    valid = idx_BCK >= 0
    vals = torch.gather(scores_BCW, -1, (idx_BCK.long() - lo).clamp_min(0))
    vals = vals.masked_fill(~valid, float("-inf"))
    order = vals.argsort(dim=-1, descending=True, stable=True)
    idx_BCK.copy_(torch.gather(idx_BCK, -1, order))


@torch.no_grad()
def indexer_topk_triton(
    q_BSID: torch.Tensor,
    k_BTD: torch.Tensor,
    w_BSI: torch.Tensor,
    topk: int,
    softmax_scale: float,
    key_range: KeyRange | None = None,
    *,
    buffer_bytes: int = 1 << 30,
    sort: bool = True,
) -> torch.Tensor:
    """Top-k key indices ``[B, S, min(topk, T)]`` int32, ``-1`` = empty slot.

    ``sort=True`` orders each row's valid slots by descending score (the reference's contract);
    ``sort=False`` leaves them in key order (the selected set is the same).
    """
    B, S = q_BSID.shape[:2]
    K = min(topk, k_BTD.shape[1])
    out_BSK = torch.full((B, S, K), INVALID_INDEX, dtype=torch.int32, device=q_BSID.device)
    blocks = score_blocks(q_BSID, k_BTD, w_BSI, softmax_scale, key_range, buffer_bytes)
    for s0, s1, lo, scores_BCW in blocks:
        kk = min(K, scores_BCW.shape[-1])
        if SELECT == "radix":
            out_BCK = out_BSK[:, s0:s1]
            radix_topk_block(scores_BCW, kk, lo, out_BCK)
            if sort:
                _sort_by_score(scores_BCW, out_BCK, lo)
        else:
            vals_BCK, idx_BCK = scores_BCW.topk(kk, dim=-1, sorted=sort)
            idx_BCK = torch.where(torch.isneginf(vals_BCK), INVALID_INDEX, idx_BCK + lo)
            out_BSK[:, s0:s1, :kk] = idx_BCK.to(torch.int32)
    return out_BSK


@torch.no_grad()
def indexer_scores_triton(
    q_BSID: torch.Tensor,
    k_BTD: torch.Tensor,
    w_BSI: torch.Tensor,
    softmax_scale: float,
    key_range: KeyRange | None = None,
) -> torch.Tensor:
    """Full masked score matrix ``[B, S, T]`` (tests and benchmarks only: O(S*T) memory)."""
    q_BSID, k_BTD, w32_BSI, qi_BS, ks_BS = _prepare(q_BSID, k_BTD, w_BSI, softmax_scale, key_range)
    B, S = q_BSID.shape[:2]
    T = k_BTD.shape[1]
    out = torch.empty(B, S, T, dtype=torch.float32, device=q_BSID.device)
    return indexer_scores_block(q_BSID, k_BTD, w32_BSI, qi_BS, ks_BS, 0, S, 0, T, out)
