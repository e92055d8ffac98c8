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
    2. ``torch.topk`` over the block's key window ``[lo, hi]`` (``lo`` = smallest key_start, ``hi`` =
       largest query_index of the block), so early causal blocks and packed documents do not pay for
       keys no row can see. ``-inf`` winners become ``-1``; rows with fewer than ``K`` valid keys get
       ``-1`` in their trailing slots, exactly like the reference.

    Memory is ``O(C * T)`` for the score buffer plus the ``[B, S, K]`` output: linear in sequence
    length, never ``[S, T]`` or ``[S, I, T]``.

Accumulation
    fp32 for the dot products and the head sum (same as the reference; only the summation order
    differs, so top-k sets differ only at near-ties with the k-th score).

Known limits
    Forward only (indices are not differentiable). Index head dim must be a power of two (128 in
    GLM-5 / DeepSeek-V3.2). ``softmax_scale`` must be positive. Slots are sorted by descending score
    (``torch.topk(sorted=True)``), as in the reference. One host sync per call when a KeyRange is
    given (the per-block key windows are read back once); none for plain causal.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from indexcache_train.ops.masking import KeyRange
from indexcache_train.ops.triton_common import INTERPRET, is_pow2, mma

INVALID_INDEX = -1


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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERP: tl.constexpr,
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
            k_ptr + b * stride_kb + t[:, None] * stride_kt + offs_d[None, :],
            mask=(t < T)[:, None],
            other=0.0,
        )
        k_t = tl.trans(k_tile)  # [D, BLOCK_N], reused by every head
        q_base = q_ptr + b * stride_qb + grow[:, None] * stride_qs + offs_d[None, :]
        w_base = w_ptr + b * stride_wb + grow * stride_ws
        for h in range(NUM_HEADS):
            q_h = tl.load(q_base + h * stride_qi, mask=row_ok[:, None], other=0.0)
            w_h = tl.load(w_base + h, mask=row_ok, other=0.0)  # fp32, softmax scale folded in
            acc += tl.maximum(mma(q_h, k_t, INTERP), 0.0) * w_h[:, None]

    valid = (t[None, :] >= ks[:, None]) & (t[None, :] <= qi[:, None])
    acc = tl.where(valid, acc, float("-inf"))
    out_ptrs = out_ptr + b * stride_ob + offs_m[:, None] * stride_os + offs_w[None, :]
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


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
    block_m: int = 64,
    block_n: int = 128,
) -> torch.Tensor:
    """Masked scores of query rows ``[row0, row0+rows)`` against keys ``[win_lo, win_lo+win_len)``.

    ``w32_BSI`` is fp32 with the softmax scale already folded in. Writes ``out_BCW[:, :rows, :win_len]``.
    """
    B, _, n_heads, D = q_BSID.shape
    T = k_BTD.shape[1]
    grid = (triton.cdiv(win_len, block_n), triton.cdiv(rows, block_m), B)
    _indexer_scores_kernel[grid](
        q_BSID,
        k_BTD,
        w32_BSI,
        qi_BS,
        ks_BS,
        out_BCW,
        rows,
        T,
        win_lo,
        win_len,
        row0,
        q_BSID.stride(0),
        q_BSID.stride(1),
        q_BSID.stride(2),
        k_BTD.stride(0),
        k_BTD.stride(1),
        w32_BSI.stride(0),
        w32_BSI.stride(1),
        qi_BS.stride(0),
        out_BCW.stride(0),
        out_BCW.stride(1),
        NUM_HEADS=n_heads,
        HEAD_DIM=D,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        INTERP=INTERPRET,
        num_warps=4 if INTERPRET else 8,
        num_stages=1 if INTERPRET else 3,
    )
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
    if not is_pow2(D) or D < 16:
        raise ValueError(f"indexer head dim {D} must be a power of two >= 16")
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
    block_m: int = 64,
    block_n: int = 128,
) -> torch.Tensor:
    """Top-k key indices ``[B, S, min(topk, T)]`` int32, ``-1`` = empty slot (descending score)."""
    causal = key_range is None
    q_BSID, k_BTD, w32_BSI, qi_BS, ks_BS = _prepare(q_BSID, k_BTD, w_BSI, softmax_scale, key_range)
    B, S = q_BSID.shape[:2]
    T = k_BTD.shape[1]
    K = min(topk, T)
    out_BSK = torch.full((B, S, K), INVALID_INDEX, dtype=torch.int32, device=q_BSID.device)
    C = _block_rows(B, S, T, block_m, buffer_bytes)
    buf = torch.empty(B * C * T, dtype=torch.float32, device=q_BSID.device)
    for s0, s1, lo, hi in _windows(qi_BS, ks_BS, S, T, C, causal):
        W = hi - lo + 1
        if W <= 0:
            continue  # no row of this block sees any key: all slots stay -1
        rows = s1 - s0
        scores_BCW = buf[: B * rows * W].view(B, rows, W)
        indexer_scores_block(
            q_BSID, k_BTD, w32_BSI, qi_BS, ks_BS, s0, rows, lo, W, scores_BCW, block_m, block_n
        )
        kk = min(K, W)
        vals_BCK, idx_BCK = scores_BCW.topk(kk, dim=-1, sorted=True)
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
    *,
    block_m: int = 64,
    block_n: int = 128,
) -> torch.Tensor:
    """Full masked score matrix ``[B, S, T]`` (tests and benchmarks only: O(S*T) memory)."""
    q_BSID, k_BTD, w32_BSI, qi_BS, ks_BS = _prepare(q_BSID, k_BTD, w_BSI, softmax_scale, key_range)
    B, S = q_BSID.shape[:2]
    T = k_BTD.shape[1]
    out = torch.empty(B, S, T, dtype=torch.float32, device=q_BSID.device)
    return indexer_scores_block(
        q_BSID, k_BTD, w32_BSI, qi_BS, ks_BS, 0, S, 0, T, out, block_m, block_n
    )
