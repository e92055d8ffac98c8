"""The fused distillation-loss kernels at tiny shapes under the CPU interpreter (``TRITON_INTERPRET=1``).

As in ``test_kernels_interpret.py``: Triton decides interpret-or-compile when a kernel is
decorated (at import), so one worker subprocess (this file run as a script) imports the kernel
module with ``TRITON_INTERPRET=1``, runs every case and prints its metrics as JSON; the tests
below assert on those numbers.

Bar (same as the GPU tier): loss and indexer gradients against the fp32 PyTorch reference
(``ops.api`` with ``backend="torch"``) at most twice the error of the same computation in
PyTorch bf16; finite everywhere; zero gradients on rows without a valid key. Plus the pieces the
GPU tier checks at production size: the TP split (emulated groups of 2 and 4 ranks, with
and without sequence-parallel row slices), several row chunks, context-parallel
key ranges, the backward scaling by the incoming gradient, and the no-grad forward.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The triton backend declines without Triton; then there is nothing to test here.
pytest.importorskip("triton")

SLACK = 2.0  # kernel error <= SLACK * bf16-PyTorch error (+ FLOOR for exact-zero baselines)
FLOOR = 1e-6


def _cases() -> dict[str, dict[str, float]]:
    """Worker body: runs in the subprocess with TRITON_INTERPRET=1 (CPU tensors)."""
    import functools

    import torch

    from indexcache_train.ops import api
    from indexcache_train.ops import triton_distill as td
    from indexcache_train.ops.masking import KeyRange
    from tests.helpers import distill_testing as tdt
    from tests.helpers import tp_emulation as tpe
    from tests.helpers.kernel_testing import causal_topk_indices, rel_err

    cpu = "cpu"
    ref_s = functools.partial(api.sparse_distill, chunk=8, backend="torch")
    ref_d = functools.partial(api.dense_distill, chunk=8, backend="torch")
    res: dict[str, dict[str, float]] = {}

    # Sparse: D 48 = 32 latent + 16 rope, 3 heads (one padded group), I = 4 (padded to 16
    # indexer rows), K = 16 > the early rows' key counts, rows 12..13 without any slot.
    res["sparse_causal"] = tdt.check_sparse(
        td.sparse_distill_triton, ref_s, 1, 16, 16, 3, 48, 4, 16, 16, None, cpu, 1, (12, 14)
    )
    # Two batch rows, packed documents, an empty key range, 20 heads = two head groups (atomic
    # head sums), D 96 = 64 + 32, and a buffer of 5 rows: four row chunks.
    kr = tdt.packed_range(2, 18, [7], cpu, empty=(10, 12))
    chunked = functools.partial(td.sparse_distill_triton, buffer_bytes=2 * 5 * 12 * 4)
    res["sparse_packed_chunks"] = tdt.check_sparse(
        chunked, ref_s, 2, 18, 18, 20, 96, 3, 32, 12, kr, cpu, 2
    )

    # Dense: qk 48 = 32 + 16 split; causal; 3 query blocks of 32 (a full and a partial group of
    # the g kernel's grouped tile order).
    res["dense_causal"] = tdt.check_dense(
        td.dense_distill_triton, ref_d, 1, 70, 70, 2, 48, 4, 16, None, cpu, 3
    )
    # Two batch rows, packed documents, rows 5..7 without a key, qk 64 (no split), and a
    # buffer that holds 16 rows: three row chunks, each with its own key window.
    kr = tdt.packed_range(2, 37, [10, 30], cpu, empty=(5, 8))
    chunked_d = functools.partial(td.dense_distill_triton, buffer_bytes=2 * 16 * 37 * 4)
    res["dense_packed_chunks"] = tdt.check_dense(
        chunked_d, ref_d, 2, 37, 37, 3, 64, 3, 16, kr, cpu, 4
    )
    # Context parallel (zigzag, cp=2, rank 0): local rows are global chunks 0 and 3 of 4.
    qi = torch.cat([torch.arange(0, 12), torch.arange(36, 48)])
    kr = KeyRange.build(1, 24, cpu, query_index_BS=qi)
    res["dense_cp"] = tdt.check_dense(
        td.dense_distill_triton, ref_d, 1, 24, 48, 2, 48, 4, 16, kr, cpu, 5
    )

    # Backward scaling and the no-grad forward.
    g = torch.Generator().manual_seed(6)
    B, S, H, Da, I, D, K = 1, 12, 6, 48, 4, 16, 8  # noqa: E741
    aq = torch.randn(B, S, H, Da, generator=g).bfloat16()
    akv = torch.randn(B, S, Da, generator=g).bfloat16()
    iq, ik, iw = tdt.indexer_inputs(B, S, S, I, D, cpu, g)
    idx = causal_topk_indices(B, S, K, cpu, None, g)
    lse = tdt.topk_lse(aq, akv, idx, Da**-0.5)

    def run(scale: float) -> list[torch.Tensor]:
        leaves = [x.clone().requires_grad_() for x in (iq, ik, iw)]
        loss = td.sparse_distill_triton(aq, akv, lse, idx, Da**-0.5, *leaves, D**-0.5)
        return [loss.detach(), *torch.autograd.grad(loss * scale, leaves)]

    full, scaled = run(1.0), run(0.37)
    with torch.no_grad():
        nograd = td.sparse_distill_triton(aq, akv, lse, idx, Da**-0.5, iq, ik, iw, D**-0.5)
    kr = KeyRange.causal(B, S, cpu)
    ak = torch.randn(B, S, H, Da, generator=g).bfloat16()
    dlse = tdt.dense_lse(aq, ak, kr, Da**-0.5)
    dense_args = (aq, ak, dlse, kr, Da**-0.5)
    with torch.no_grad():
        dense_nograd = td.dense_distill_triton(*dense_args, iq, ik, iw, D**-0.5)
    dense_grad = td.dense_distill_triton(*dense_args, *(x.clone().requires_grad_() for x in (iq, ik, iw)), D**-0.5)  # fmt: skip
    # TP: each emulated rank holds its share of the heads (and its row slice under sequence
    # parallelism); the reduction sums the recorded partials (tests/helpers/tp_emulation.py).
    res["tp"] = _tp_cases(td, tdt, tpe, cpu)
    res["misc"] = {
        # dq (bf16) * grad is rounded once, like torch's bf16 product; dk, dw are fp32 until then.
        "scaled_dq": rel_err(scaled[1].float(), (full[1] * 0.37).float()),
        "scaled_dk": rel_err(scaled[2].float(), full[2].float() * 0.37),
        "scaled_dw": rel_err(scaled[3], full[3] * 0.37),
        "nograd_equal": float(float(nograd) == float(full[0]) and not nograd.requires_grad),
        "dense_nograd_equal": float(float(dense_nograd) == float(dense_grad.detach())),
        "dense_grad_fn": float(dense_grad.requires_grad),
    }
    return res


def _tp_cases(td, tdt, tpe, cpu) -> dict[str, dict[str, float]]:
    """Emulated TP groups (worker side): relative errors of loss, dq, dk, dw against the
    one-rank run, per case (``tp`` records the group size)."""
    import functools

    import torch

    from indexcache_train.ops.masking import KeyRange
    from tests.helpers.kernel_testing import causal_topk_indices

    g = torch.Generator().manual_seed(11)
    out: dict[str, dict[str, float]] = {}

    def sparse(name, B, S, H, K, tp, sp, buffer_bytes=None):
        Da, I, D = 48, 4, 16  # noqa: E741
        aq, akv = tdt._randn((B, S, H, Da), cpu, g), tdt._randn((B, S, Da), cpu, g)
        idx = causal_topk_indices(B, S, K, cpu, None, g)
        lse = tdt.topk_lse(aq, akv, idx, Da**-0.5)
        term = functools.partial(td.sparse_distill_triton, buffer_bytes=buffer_bytes)
        indexer = tdt.indexer_inputs(B, S, S, I, D, cpu, g)
        attn = (aq, akv, lse, idx, Da**-0.5)
        out[name] = {**tpe.tp_error(term, attn, indexer, D**-0.5, tp, sp), "tp": tp}

    def dense(name, B, S, T, H, tp, sp, kr, buffer_bytes=None):
        Dqk, I, D = 48, 4, 16  # noqa: E741
        aq, ak = tdt._randn((B, S, H, Dqk), cpu, g), tdt._randn((B, T, H, Dqk), cpu, g)
        kr = kr or KeyRange.causal(B, S, cpu)
        lse = tdt.dense_lse(aq, ak, kr, Dqk**-0.5)
        term = functools.partial(td.dense_distill_triton, buffer_bytes=buffer_bytes)
        indexer = tdt.indexer_inputs(B, S, T, I, D, cpu, g)
        attn = (aq, ak, lse, kr, Dqk**-0.5)
        out[name] = {**tpe.tp_error(term, attn, indexer, D**-0.5, tp, sp), "tp": tp}

    # Sparse, SP row slices: two batch rows, chunks of 5 rows (a partial last chunk).
    sparse("sparse_sp2_chunks", 2, 24, 4, 8, 2, True, buffer_bytes=2 * 2 * 5 * 8 * 4)
    sparse("sparse_sp4", 1, 16, 4, 8, 4, True)
    sparse("sparse_tp2_no_sp", 1, 12, 4, 8, 2, False)
    # Dense, causal SP slices (different key windows per slice: one reduce per slice), two
    # chunks of 16 rows per slice (z buffer + two partial buffers of [16, 48]).
    dense("dense_sp2_chunks", 1, 48, 48, 4, 2, True, None, buffer_bytes=16 * 48 * 3 * 4)
    # Packed documents; rows 26..29 (in slice 1) see no key: slice 1's windows shrink.
    kr = tdt.packed_range(2, 40, [9, 22], cpu, empty=(26, 30))
    dense("dense_sp2_packed_empty", 2, 40, 40, 4, 2, True, kr)
    # Context parallel (zigzag, cp=2, rank 0) under SP: slice 0 = chunk 0, slice 1 = chunk 3.
    qi = torch.cat([torch.arange(0, 16), torch.arange(48, 64)])
    dense("dense_sp2_cp", 1, 32, 64, 4, 2, True, KeyRange.build(1, 32, cpu, query_index_BS=qi))
    dense("dense_tp2_no_sp", 1, 24, 24, 4, 2, False, None)
    return out


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, float]]:
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(repo) + os.pathsep + env.get("PYTHONPATH", ""),
        TRITON_INTERPRET="1",
        TORCHDYNAMO_DISABLE="1",
    )
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        env=env,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CASES = ["sparse_causal", "sparse_packed_chunks", "dense_causal", "dense_packed_chunks", "dense_cp"]


@pytest.mark.parametrize("case", CASES)
def test_distill_interpret(results: dict[str, dict[str, float]], case: str) -> None:
    r = results[case]
    for n in ("loss", "dq", "dk", "dw"):
        assert r[n + "_finite"] == 1.0, (n, r)
        assert r[n] <= SLACK * r[n + "_bf16"] + FLOOR, (n, r[n], r[n + "_bf16"])
    assert r["dq_empty_rows_zero"] == 1.0, r
    assert r["loss_ref"] > 0.0, r


def test_cases_cover_empty_rows(results: dict[str, dict[str, float]]) -> None:
    assert results["sparse_causal"]["rows_without_keys"] == 2
    assert results["sparse_packed_chunks"]["rows_without_keys"] == 4  # 2 rows x 2 batch rows
    assert results["dense_packed_chunks"]["rows_without_keys"] == 6


TP_CASES = [
    "sparse_sp2_chunks",
    "sparse_sp4",
    "sparse_tp2_no_sp",
    "dense_sp2_chunks",
    "dense_sp2_packed_empty",
    "dense_sp2_cp",
    "dense_tp2_no_sp",
]


@pytest.mark.parametrize("case", TP_CASES)
def test_tp_group_equals_one_rank(results: dict[str, dict[str, float]], case: str) -> None:
    r = results["tp"][case]
    # The same sums in another order: fp32 rounding, at most a rare bf16 rounding flip in dq.
    assert max(r["loss"], r["dq"], r["dw"]) <= 1e-3, r
    # Each rank's dk partial is rounded to k's dtype (bf16, half an ulp = 2^-9 relative at
    # most) before the group sums them, as the all-gather's backward does in the model.
    assert r["dk"] <= r["tp"] * 2**-9, r


def test_scaling_nograd(results: dict[str, dict[str, float]]) -> None:
    m = results["misc"]
    assert m["scaled_dq"] <= 1e-6 and m["scaled_dk"] <= 1e-2 and m["scaled_dw"] <= 1e-6, m
    assert m["nograd_equal"] == 1.0 and m["dense_nograd_equal"] == 1.0, m
    assert m["dense_grad_fn"] == 1.0, m


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    print(json.dumps(_cases()))
