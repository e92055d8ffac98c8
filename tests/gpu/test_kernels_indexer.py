"""GPU: Triton indexer scores + top-k against the fp32 reference (fresh random inputs each case).

Bar: scores within 2x the error of the same computation in PyTorch bf16; top-k recall >= 0.999
with every mismatch at a tie with the row's k-th reference score; ``-1`` slots exactly where the
reference has them. Shapes: GLM-5 (32 x 128) and DeepSeek-V3.2 (64 x 128) indexers, k = 2048,
sequences that are not a multiple of the block, k above the key count of early rows, packed
documents, context-parallel query offsets, and several query blocks per call.
"""

from __future__ import annotations

import functools
import zlib

import pytest
import torch

from indexcache_train.ops import api
from indexcache_train.ops.backend_triton import triton_missing
from indexcache_train.ops.masking import KeyRange
from indexcache_train.ops.triton_indexer import indexer_topk_triton
from tests.helpers.kernel_testing import check_indexer

DEV = "cuda"


def _api(q, k, w, topk, scale, kr):
    return api.indexer_topk(
        q_BSID=q, k_BTD=k, w_BSI=w, topk=topk, softmax_scale=scale, key_range=kr, backend="triton"
    )


def _cp_rank0(S_local: int) -> KeyRange:
    # Zigzag CP with cp=2: rank 0 owns global chunks 0 and 3 of 4 (queries local, keys global).
    c = S_local // 2
    qi = torch.cat([torch.arange(0, c), torch.arange(3 * c, 4 * c)])
    return KeyRange.build(1, S_local, DEV, query_index_BS=qi)


def _packed(S: int, starts: list[int]) -> KeyRange:
    ks = torch.zeros(S, dtype=torch.long)
    for st in starts:
        ks[st:] = st
    return KeyRange.build(1, S, DEV, key_start_BS=ks)


CASES = {
    # name: (impl, B, S, T, I, D, K, key_range factory)
    "glm5_causal_4k": (_api, 1, 4096, 4096, 32, 128, 2048, lambda: None),
    "dsv32_causal_4k": (_api, 1, 4096, 4096, 64, 128, 2048, lambda: None),
    "glm5_odd_seq_multiblock": (
        # 3001 rows (not a multiple of the 64-row block); a 64 MiB buffer forces 3 query blocks.
        functools.partial(indexer_topk_triton, buffer_bytes=2 * 1280 * 3001 * 4),
        2, 3001, 3001, 32, 128, 2048, lambda: None,
    ),
    "dsv32_packed_4k": (_api, 1, 4096, 4096, 64, 128, 2048, lambda: _packed(4096, [1500, 2600])),
    "glm5_cp_rank0_8k": (_api, 1, 4096, 8192, 32, 128, 2048, lambda: _cp_rank0(4096)),
}  # fmt: skip


def test_kernel_is_used() -> None:
    assert triton_missing() is None


@pytest.mark.parametrize("name", list(CASES))
def test_indexer_topk_gpu(name: str) -> None:
    impl, B, S, T, n_idx_heads, D, K, make_kr = CASES[name]
    r = check_indexer(
        impl, B, S, T, n_idx_heads, D, K, make_kr(), DEV, seed=zlib.crc32(name.encode())
    )
    print(f"\n{name}: " + ", ".join(f"{k}={v:.3g}" for k, v in r.items()))
    assert r["shape_ok"] == 1.0
    assert r["scores_inf_ok"] == 1.0
    assert r["scores"] <= 2 * r["scores_bf16"], r
    assert r["recall"] >= 0.999, r
    assert r["misses_not_ties"] == 0, r
    assert r["empty_slots"] == r["empty_slots_ref"] > 0, r
