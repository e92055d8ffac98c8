"""GPU: dense attention with LSE (cuDNN for plain causal, Triton for KeyRange), fwd and bwd.

Bar: out, LSE, dQ, dK, dV within 2x the error of the same computation in PyTorch bf16, against
the fp32 reference on fresh random inputs; LSE ``[B, S, H]`` fp32, natural log, ``-inf`` exactly
on rows without keys. Production shapes: GLM-5 (64 heads, qk 192+64, v 256) and DeepSeek-V3.2
(128 heads, qk 128+64, v 128) at 4K, through the dispatching API (cuDNN where it applies) and
forced through the Triton kernel; packed documents, CP offsets, odd lengths, empty rows.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from indexcache_train.ops import api
from indexcache_train.ops.backend_triton import dense_attention_kernel, triton_missing
from indexcache_train.ops.masking import KeyRange
from indexcache_train.ops.triton_dense_attention import dense_attention_triton
from tests.helpers.kernel_testing import check_dense

DEV = "cuda"


def _api(q, k, v, scale, kr):
    return api.dense_attention(
        q_BSHD=q, k_BTHD=k, v_BTHV=v, softmax_scale=scale, key_range=kr, backend="triton"
    )


def _packed(B: int, S: int, starts: list[int]) -> KeyRange:
    ks = torch.zeros(S, dtype=torch.long)
    for st in starts:
        ks[st:] = st
    return KeyRange.build(B, S, DEV, key_start_BS=ks)


def _cp_rank0(S_local: int) -> KeyRange:
    c = S_local // 2
    qi = torch.cat([torch.arange(0, c), torch.arange(3 * c, 4 * c)])
    return KeyRange.build(1, S_local, DEV, query_index_BS=qi)


def _empty_rows(S: int) -> KeyRange:
    ks = torch.zeros(S, dtype=torch.long)
    ks[100:140] = 10**6  # rows 100..139 see no key at all
    return KeyRange.build(1, S, DEV, key_start_BS=ks)


CASES = {
    # name: (impl, B, S, T, H, D, V, key_range factory)
    "glm5_causal_api_4k": (_api, 1, 4096, 4096, 64, 256, 256, lambda: None),
    "glm5_causal_triton_4k": (dense_attention_triton, 1, 4096, 4096, 64, 256, 256, lambda: None),
    "dsv32_causal_api_4k": (_api, 1, 4096, 4096, 128, 192, 128, lambda: None),
    "dsv32_causal_triton_4k": (dense_attention_triton, 1, 4096, 4096, 128, 192, 128, lambda: None),
    "glm5_packed_4k": (_api, 1, 4096, 4096, 64, 256, 256, lambda: _packed(1, 4096, [1000, 2900])),
    "dsv32_packed_odd": (_api, 2, 3001, 3001, 16, 192, 128, lambda: _packed(2, 3001, [777, 2000])),
    "glm5_cp_rank0": (_api, 1, 2048, 4096, 16, 256, 256, lambda: _cp_rank0(2048)),
    "dsv32_empty_rows": (_api, 1, 1000, 1000, 8, 192, 128, lambda: _empty_rows(1000)),
}  # fmt: skip


def test_kernel_is_used() -> None:
    assert triton_missing() is None


@pytest.mark.parametrize("name", list(CASES))
def test_dense_attention_gpu(name: str) -> None:
    impl, B, S, T, H, D, V, make_kr = CASES[name]
    kr = make_kr()
    q = torch.empty(B, S, H, D, device=DEV, dtype=torch.bfloat16)
    k = torch.empty(B, T, H, D, device=DEV, dtype=torch.bfloat16)
    v = torch.empty(B, T, H, V, device=DEV, dtype=torch.bfloat16)
    backend = "triton" if impl is dense_attention_triton else dense_attention_kernel(q, k, v, kr)
    r = check_dense(impl, B, S, T, H, D, V, kr, DEV, seed=zlib.crc32(name.encode()))
    print(f"\n{name} [{backend}]: " + ", ".join(f"{k}={v:.3g}" for k, v in r.items()))
    assert r["lse_shape_ok"] == 1.0 and r["lse_inf_ok"] == 1.0
    for n in ("out", "lse", "dq", "dk", "dv"):
        assert r[n] <= 2 * r[n + "_bf16"], (n, r)


def test_cudnn_is_used_for_plain_causal() -> None:
    """cuDNN takes DeepSeek-V3.2's qk 192 / v 128 (perf-anchors.md); KeyRange never goes there."""
    q = torch.empty(1, 256, 2, 192, device=DEV, dtype=torch.bfloat16)
    v = torch.empty(1, 256, 2, 128, device=DEV, dtype=torch.bfloat16)
    assert dense_attention_kernel(q, q, v, None) == "cudnn"
    kr = KeyRange.causal(1, 256, DEV)
    assert dense_attention_kernel(q, q, v, kr) == "triton"
    q256 = torch.empty(1, 256, 2, 256, device=DEV, dtype=torch.bfloat16)
    print(f"\ncuDNN takes qk 256 / v 256: {dense_attention_kernel(q256, q256, q256, None)}")
