"""GPU: the fused distillation loss (sparse and dense terms) through ``ops.api``.

Bar: the loss and the indexer gradients (dq, dk, dw) within 2x the error of the same computation
in PyTorch bf16 against the fp32 reference (``ops.api`` with ``backend="torch"`` on fp32 copies
of the same bf16 inputs), finite, and exactly zero gradients on rows without a valid key. The
kernel side runs through ``ops.api`` with ``backend="triton"`` (the dispatch the model uses;
``"triton"`` errors instead of falling back). Production shapes: GLM-5 (64 heads, indexer 32 x
128, qk 256 dense) and DeepSeek-V3.2 (128 heads, indexer 64 x 128, qk 192 dense), k = 2048 at
S = 4096; packed documents with rows whose key range is empty; several row chunks; CP offsets;
and the tensor-parallel path (per-slice head sums, the reduction, the KL kernels on one rank's
rows) against one rank holding every head, with the TP group emulated on the one GPU.
"""

from __future__ import annotations

import functools
import zlib

import pytest
import torch

from indexcache_train.ops import api
from indexcache_train.ops import triton_distill as td
from indexcache_train.ops.backend_triton import triton_missing
from indexcache_train.ops.masking import KeyRange
from tests.helpers import distill_testing as tdt
from tests.helpers import tp_emulation as tpe
from tests.helpers.kernel_testing import causal_topk_indices

DEV = "cuda"
SPARSE = functools.partial(api.sparse_distill, backend="triton")
SPARSE_REF = functools.partial(api.sparse_distill, backend="torch")
DENSE = functools.partial(api.dense_distill, backend="triton")
DENSE_REF = functools.partial(api.dense_distill, backend="torch")


def _packed_empty(S: int) -> KeyRange:
    # Documents from 0, 1000, 1700; rows 2500..2519 see no key (key_start past the row).
    return tdt.packed_range(1, S, [1000, 1700], DEV, empty=(2500, 2520))


def _cp(B: int, S: int) -> KeyRange:
    # Zigzag CP (cp=2, rank 0): local rows are global chunks 0 and 3 of 4 (T = 2 S).
    h = S // 2
    qi = torch.cat([torch.arange(0, h), torch.arange(3 * h, 4 * h)])
    return KeyRange.build(B, S, DEV, query_index_BS=qi)


SPARSE_CASES = {
    # name: (B, S, T, H, Da, I, D, K, key_range factory, rows without slots, buffer bytes)
    "glm5_4k": (1, 4096, 4096, 64, 576, 32, 128, 2048, lambda: None, None, None),
    "dsv32_4k": (1, 4096, 4096, 128, 576, 64, 128, 2048, lambda: None, None, None),
    # 3 row chunks of 1024 (8 MiB buffer), packed documents, 20 rows with no slot at all.
    "glm5_packed_empty_chunks_3k": (
        1, 3000, 3000, 64, 576, 32, 128, 2048, lambda: _packed_empty(3000), (2500, 2520), 8 << 20,
    ),
    "odd_b2_k300": (2, 1000, 1000, 16, 576, 8, 128, 300, lambda: None, (0, 3), None),
}  # fmt: skip

DENSE_CASES = {
    # name: (B, S, T, H, Dqk, I, D, key_range factory, buffer bytes)
    "glm5_4k": (1, 4096, 4096, 64, 256, 32, 128, lambda: None, None),
    "dsv32_4k": (1, 4096, 4096, 128, 192, 64, 128, lambda: None, None),
    # Chunks of 640 rows (8 MiB buffer), packed documents, 20 rows with an empty key range.
    "glm5_packed_empty_chunks_3k": (
        1, 3000, 3000, 64, 256, 32, 128, lambda: _packed_empty(3000), 8 << 20,
    ),
    "cp_b2": (2, 1024, 2048, 16, 192, 32, 128, lambda: _cp(2, 1024), None),
}  # fmt: skip


def test_kernel_is_used() -> None:
    assert triton_missing() is None


def _assert(r: dict[str, float]) -> None:
    for n in ("loss", "dq", "dk", "dw"):
        assert r[n + "_finite"] == 1.0, (n, r)
        assert r[n] <= 2 * r[n + "_bf16"], (n, r)
    assert r["dq_empty_rows_zero"] == 1.0, r


@pytest.mark.parametrize("name", list(SPARSE_CASES))
def test_sparse_term_gpu(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    B, S, T, H, Da, I, D, K, make_kr, empty, buf = SPARSE_CASES[name]  # noqa: E741
    if buf is not None:
        monkeypatch.setattr(td, "SPARSE_BUFFER", buf)
    r = tdt.check_sparse(
        SPARSE,
        SPARSE_REF,
        B,
        S,
        T,
        H,
        Da,
        I,
        D,
        K,
        make_kr(),
        DEV,
        zlib.crc32(name.encode()),
        empty,
    )
    print(f"\nsparse {name}: " + ", ".join(f"{k}={v:.3g}" for k, v in r.items()))
    _assert(r)
    assert r["rows_with_empty_slots"] > 0
    if empty is not None:
        assert r["rows_without_keys"] == B * (empty[1] - empty[0])


@pytest.mark.parametrize("name", list(DENSE_CASES))
def test_dense_term_gpu(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    B, S, T, H, Dqk, I, D, make_kr, buf = DENSE_CASES[name]  # noqa: E741
    if buf is not None:
        monkeypatch.setattr(td, "DENSE_BUFFER", buf)
    r = tdt.check_dense(
        DENSE, DENSE_REF, B, S, T, H, Dqk, I, D, make_kr(), DEV, zlib.crc32(name.encode())
    )
    print(f"\ndense {name}: " + ", ".join(f"{k}={v:.3g}" for k, v in r.items()))
    _assert(r)
    if "empty" in name:
        assert r["rows_without_keys"] == 20


# TP groups emulated on one GPU (tests/helpers/tp_emulation.py): each "rank" holds its share of
# the heads and (sequence parallel) its slice of the indexer rows; the reduction sums the
# recorded partials. name: (form, tp, sequence_parallel, B, S, T, H, Da, I, D, K, buffer bytes)
TP_CASES = {
    "sparse_glm5_sp2": ("sparse", 2, True, 1, 2048, 2048, 64, 576, 32, 128, 2048, None),
    "sparse_glm5_sp4_chunks": ("sparse", 4, True, 1, 2048, 2048, 64, 576, 32, 128, 2048, 8 << 20),
    "sparse_heads_only_tp2": ("sparse", 2, False, 1, 1024, 1024, 64, 576, 32, 128, 512, None),
    "dense_glm5_sp2": ("dense", 2, True, 1, 2048, 2048, 64, 256, 32, 128, 0, None),
    "dense_glm5_sp4_chunks": ("dense", 4, True, 1, 2048, 2048, 64, 256, 32, 128, 0, 8 << 20),
    "dense_dsv32_cp_sp2": ("dense", 2, True, 2, 1024, 2048, 128, 192, 64, 128, 0, None),
    "dense_heads_only_tp2": ("dense", 2, False, 1, 1024, 1024, 64, 256, 32, 128, 0, None),
}  # fmt: skip


@pytest.mark.parametrize("name", list(TP_CASES))
def test_tp_group_equals_one_rank_gpu(name: str) -> None:
    """The TP path (per-slice head sums -> reduction -> KL kernels on this rank's rows) equals
    the one-rank, all-heads run up to summation order; ``dk`` also carries each rank's rounding
    to k's dtype before the sum (2^-9 relative at most per rank), as in the model."""
    form, tp, sp, B, S, T, H, Da, I, D, K, buf = TP_CASES[name]  # noqa: E741
    g = torch.Generator(device=DEV).manual_seed(zlib.crc32(name.encode()))
    aq = torch.randn(B, S, H, Da, device=DEV, generator=g).bfloat16()
    indexer = tdt.indexer_inputs(B, S, T, I, D, DEV, g)
    if form == "sparse":
        k = torch.randn(B, T, Da, device=DEV, generator=g).bfloat16()
        rows_arg = causal_topk_indices(B, S, K, DEV, None, g)
        lse = tdt.topk_lse(aq, k, rows_arg, Da**-0.5)
        term = functools.partial(td.sparse_distill_triton, buffer_bytes=buf)
    else:
        k = torch.randn(B, T, H, Da, device=DEV, generator=g).bfloat16()
        rows_arg = _cp(B, S) if T > S else KeyRange.causal(B, S, DEV)
        lse = tdt.dense_lse(aq, k, rows_arg, Da**-0.5)
        term = functools.partial(td.dense_distill_triton, buffer_bytes=buf)
    r = tpe.tp_error(term, (aq, k, lse, rows_arg, Da**-0.5), indexer, D**-0.5, tp, sp)
    print(f"\ntp {name}: " + ", ".join(f"{k}={v:.3g}" for k, v in r.items()))
    assert max(r["loss"], r["dq"], r["dw"]) <= 1e-3, r
    assert r["dk"] <= tp * 2**-9, r
