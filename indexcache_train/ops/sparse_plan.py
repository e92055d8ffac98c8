"""Row-block plans for sparse attention: the union of a few neighbouring rows' top-k keys.

Why: one TP rank of GLM-5 / DeepSeek-V3.2 runs 16 query heads, so a sparse-attention program that
handles one query row has a 16-row matrix tile and gathers 1152 bytes of latent key (576 bf16) per
selected key for only ``2 * 16 * 1088`` FLOPs, and its backward scatter-adds 576 fp32 values per
(row, selected key) into dKV. Neighbouring query rows of a trained indexer select mostly the same
keys, so a program that serves ``BM`` rows (``BM * heads = 64`` matrix rows) over the *union* of
their selections gathers each shared key once, adds into its dKV row once, and runs 64-row tensor
core tiles. Keys a row did not select are masked out of that row's softmax, so the result is the
per-row computation exactly (up to fp32 summation order).

Plan layout (``[B, NB, U]`` int32, ``NB = ceil(S / BM)``): the block's union in ascending key order
(ascending order also makes the gathers walk memory forwards), one entry per key,
``key << MEMBER_BITS | membership``, where bit ``r`` of ``membership`` says row ``nb * BM + r``
selected the key; ``-1`` pads each block to ``U`` (the largest union, rounded up). ``count_BN`` holds
each block's union size. Built with torch sorts in chunks of blocks, so its workspace is bounded
(``chunk_elems`` int64 elements per temporary) and its output is at most the size of the indices.

A row's index list is treated as a *set* (top-k never repeats a key; a repeated key is counted once
here, where the per-row kernels would count it twice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MEMBER_BITS = 8  # membership bits per entry: up to 8 rows per block
MAX_KEYS = 1 << (31 - MEMBER_BITS)  # keys must fit in the remaining 23 bits of an int32
ALIGN = 64  # the union width is rounded up to a multiple of the kernels' largest key tile


@dataclass(frozen=True)
class RowBlockPlan:
    """The per-block key unions of one ``[B, S, K]`` index tensor (see the module docstring)."""

    rows_per_block: int
    entries_BNU: torch.Tensor  # int32, key << MEMBER_BITS | membership, -1 padded
    count_BN: torch.Tensor  # int32, union size per block
    #: Valid index slots / union entries: how many of a block's rows share a key on average
    #: (1 = no sharing, ``rows_per_block`` = identical selections). Read once on the host.
    gain: float

    @property
    def num_blocks(self) -> int:
        return self.entries_BNU.shape[1]


def build_row_block_plan(
    idx_BSK: torch.Tensor, rows_per_block: int, chunk_elems: int = 1 << 24
) -> RowBlockPlan:
    """The row-block plan of ``idx_BSK`` (``-1`` = empty slot). One host sync (union sizes)."""
    if not 2 <= rows_per_block <= MEMBER_BITS:
        raise ValueError(f"rows_per_block must be in [2, {MEMBER_BITS}], got {rows_per_block}")
    if idx_BSK.dim() != 3:
        raise ValueError(f"indices must be [B, S, K], got shape {tuple(idx_BSK.shape)}")
    B, S, K = idx_BSK.shape
    bm = rows_per_block
    NB = -(-S // bm)
    if NB * bm != S:  # pad the last block with empty rows
        pad = idx_BSK.new_full((B, NB * bm - S, K), -1)
        idx_BSK = torch.cat([idx_BSK, pad], 1)
    flat_BNW = idx_BSK.view(B, NB, bm * K)
    W = bm * K
    entries = torch.full((B, NB, W), -1, dtype=torch.int32, device=idx_BSK.device)
    count = torch.zeros(B, NB, dtype=torch.int32, device=idx_BSK.device)
    row_W = torch.arange(bm, device=idx_BSK.device).repeat_interleave(K)
    step = max(1, chunk_elems // (B * W))
    for n0 in range(0, NB, step):
        n1 = min(NB, n0 + step)
        e, c = _union_chunk(flat_BNW[:, n0:n1].int(), row_W.int(), bm)
        entries[:, n0:n1] = e
        count[:, n0:n1] = c
    n_valid, n_union, widest, top = torch.stack(
        [(idx_BSK >= 0).sum(), count.sum().long(), count.max().long(), idx_BSK.max().long()]
    ).tolist()  # the plan's one host sync
    if top >= MAX_KEYS:
        raise ValueError(f"row-block plans take key indices < {MAX_KEYS} (got {top})")
    width = max(ALIGN, -(-widest // ALIGN) * ALIGN)
    gain = n_valid / n_union if n_union else 1.0
    return RowBlockPlan(bm, entries[..., : min(W, width)].contiguous(), count, gain)


def _union_chunk(
    x_BNW: torch.Tensor, row_W: torch.Tensor, bm: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique keys of each block with their membership bits, ``-1`` padded.

    Sorts ``key * bm + row`` in int32 (keys < 2^23 and bm <= 8 keep it below 2^26; half the
    bytes of an int64 sort)."""
    big = torch.iinfo(torch.int32).max
    v = torch.where(x_BNW >= 0, x_BNW * bm + row_W, big)
    v, _ = v.sort(dim=-1)
    valid = v != big
    key, row = v // bm, v % bm
    prev_key = torch.nn.functional.pad(key, (1, 0), value=-1)[..., :-1]
    prev_v = torch.nn.functional.pad(v, (1, 0), value=-1)[..., :-1]
    first = valid & (key != prev_key)
    # A (key, row) pair listed twice in one row adds its bit once (sets, not multisets).
    new_pair = valid & (v != prev_v)
    W = v.shape[-1]
    seg = torch.where(valid, first.long().cumsum(-1) - 1, W)  # column W collects padding
    bits = torch.zeros(*v.shape[:-1], W + 1, dtype=torch.int32, device=v.device)
    bits.scatter_add_(-1, seg, torch.where(new_pair, 1 << row, 0).to(torch.int32))
    keys = torch.full_like(bits, -1)
    keys.scatter_(-1, torch.where(first, seg, W), torch.where(first, key, -1).to(torch.int32))
    keys, bits = keys[..., :W], bits[..., :W]
    entries = torch.where(keys >= 0, (keys << MEMBER_BITS) | bits, -1).to(torch.int32)
    return entries, first.sum(-1).to(torch.int32)
