"""GPU: the fused distillation loss (sparse and dense terms) through ``ops.api``.

Bar: the loss and the indexer gradients (dq, dk, dw) within 2x the error of the same computation
in PyTorch bf16 against the fp32 reference (``ops.api`` with ``backend="torch"`` on fp32 copies
of the same bf16 inputs), finite, and exactly zero gradients on rows without a valid key. The
kernel side runs through ``ops.api`` with ``backend="triton"`` (the dispatch the model uses;
``"triton"`` errors instead of falling back). Production shapes: GLM-5 (64 heads, indexer 32 x
128, qk 256 dense) and DeepSeek-V3.2 (128 heads, indexer 64 x 128, qk 192 dense), k = 2048 at
S = 4096; packed documents with rows whose key range is empty; several row chunks; CP offsets.
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
from tests.helpers.kernel_testing import causal_topk_indices, rel_err

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


def test_sparse_tp_split_gpu() -> None:
    """The TP path: this rank's 32 of 64 heads, ``p_reduce`` adds the other 32 (all-reduce
    stand-in); loss and gradients equal the all-heads run (up to summation order)."""
    g = torch.Generator(device=DEV).manual_seed(7)
    B, S, H, Da, I, D, K = 1, 2048, 64, 576, 32, 128, 2048  # noqa: E741
    aq = torch.randn(B, S, H, Da, device=DEV, generator=g).bfloat16()
    akv = torch.randn(B, S, Da, device=DEV, generator=g).bfloat16()
    iq, ik, iw = tdt.indexer_inputs(B, S, S, I, D, DEV, g)
    idx = causal_topk_indices(B, S, K, DEV, None, g)
    lse = tdt.topk_lse(aq, akv, idx, Da**-0.5)
    other = td.topk_head_probs_triton(aq[:, :, 32:], akv, lse[:, :, 32:], idx, Da**-0.5)

    def run(heads: slice, reduce) -> list[torch.Tensor]:
        leaves = [x.clone().requires_grad_() for x in (iq, ik, iw)]
        loss = td.sparse_distill_triton(
            aq[:, :, heads], akv, lse[:, :, heads], idx, Da**-0.5, *leaves, D**-0.5, reduce
        )
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    full = run(slice(None), None)
    split = run(slice(0, 32), lambda p: p.add_(other[:, : p.shape[1]]))
    errs = [rel_err(a.float(), b.float()) for a, b in zip(split, full)]
    print(f"\ntp split rel errors (loss, dq, dk, dw): {errs}")
    assert max(errs) <= 1e-3, errs
