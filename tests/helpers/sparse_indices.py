"""Top-k index patterns for sparse-attention tests and benchmarks, with tunable row overlap.

Random stratified indices (``causal_topk_indices`` in the kernel-testing helpers) give
neighbouring query rows almost disjoint selections: the L2-unfriendly worst case. A trained
indexer does not: neighbouring rows share most of their keys. ``correlated_topk_indices`` draws
scores ``sqrt(c) * shared[block, t] + sqrt(1 - c) * noise[s, t]`` with one shared field per block of
``rows_per_block`` rows and keeps each row's top-k inside its KeyRange, so ``c`` (the score
correlation of two rows of a block) tunes how many keys they share: 0 gives independent
selections, 1 identical ones (up to each row's causal range). Benchmarks report the resulting
row-block gain (:mod:`indexcache_train.ops.sparse_plan`), not ``c``.
"""

from __future__ import annotations

import math

import torch

from indexcache_train.ops.masking import KeyRange


def correlated_topk_indices(
    B: int,
    S: int,
    K: int,
    correlation: float,
    rows_per_block: int,
    device: torch.device | str,
    key_range: KeyRange | None = None,
    generator: torch.Generator | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Duplicate-free ``[B, S, K]`` int32 indices inside each row's KeyRange, ``-1`` padded.

    Built ``chunk`` rows at a time (a ``[B, chunk, T]`` score block), so memory is O(chunk * T).
    """
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [0, 1], got {correlation}")
    key_range = key_range or KeyRange.causal(B, S, device)
    T = int(key_range.query_index_BS.max()) + 1 if S else 0
    chunk = max(rows_per_block, chunk // rows_per_block * rows_per_block)
    a, c = math.sqrt(correlation), math.sqrt(1.0 - correlation)
    out = torch.full((B, S, K), -1, dtype=torch.int32, device=device)
    k_eff = min(K, T)
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        nb = -(-(s1 - s0) // rows_per_block)
        shared = torch.randn(B, nb, 1, T, device=device, generator=generator)
        shared = shared.expand(-1, -1, rows_per_block, -1).reshape(B, nb * rows_per_block, T)
        noise = torch.randn(B, s1 - s0, T, device=device, generator=generator)
        scores = a * shared[:, : s1 - s0] + c * noise
        valid = key_range.rows(s0, s1).dense_mask(T)
        scores = scores.masked_fill(~valid, float("-inf"))
        top = scores.topk(k_eff, dim=-1)
        idx = torch.where(torch.isfinite(top.values), top.indices, -1)
        out[:, s0:s1, :k_eff] = idx.to(torch.int32)
    return out
