"""The GPU benchmark scripts (GLM-5-dims layers, step profile, MoE experts) cannot rot: their
``--smoke`` mode runs the same code on the CPU at toy sizes; the profile classifier and the
allocator-trace replay are checked on recorded kernel names and a hand-made trace."""

from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench"
sys.path.insert(0, str(BENCH))

import bench_glm5_layers  # noqa: E402
import bench_moe_experts  # noqa: E402
import profile_step  # noqa: E402

# Kernel names as torch.profiler reports them on the H100 (torch 2.11, CUDA 13).
RECORDED = [
    ("_sparse_mla_bwd_kernel", False, "sparse MLA bwd"),
    ("_sparse_mla_fwd_kernel", False, "sparse MLA fwd"),
    ("_topk_kl_kernel", False, "distillation kernels"),
    ("_topk_probs_kernel", False, "distillation kernels"),
    ("_dense_g_kernel", False, "distillation kernels"),
    ("_row_lse_kernel", False, "distillation kernels"),
    ("_indexer_scores_kernel", False, "indexer scores + top-k"),
    (
        "void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>("
        "at::cuda::detail::TensorInfo<float const, unsigned int>, unsigned int)",
        False,
        "indexer scores + top-k",
    ),
    (
        "void at::native::bitonicSortKVInPlace<2, -1, 16, 16, float, long, "
        "at::native::GTOp<float, true>, unsigned int>(at::cuda::detail::TensorInfo<float, "
        "unsigned int>, unsigned int)",
        False,
        "indexer scores + top-k",
    ),
    (
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_"
        "kernel0_0",
        False,
        "dense attention",
    ),
    ("_attn_fwd_kernel", False, "dense attention"),
    (
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_"
        "execute_segment_k_off_kernel__5x_cublas",
        False,
        "GEMMs",
    ),
    ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTT", True, "GEMMs"),  # expert GEMMs stay GEMMs
    (
        "void cutlass::device_kernel<at::cuda::detail::enable_3x_kernel_for_sm9x<cutlass::gemm::"
        "kernel::GemmUniversal<cutlass::gemm::GroupProblemShape<cute::tuple<int, int, int> > > > >",
        True,
        "GEMMs",
    ),
    (
        "void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<c10::"
        "BFloat16, c10::BFloat16, c10::BFloat16, at::native::binary_internal::MulFunctor<float> >, "
        "std::array<char*, 3ul> >(int, at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, "
        "c10::BFloat16, at::native::binary_internal::MulFunctor<float> >, std::array<char*, 3ul>)",
        False,
        "elementwise / copies / cat / casts",
    ),
    (
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy_contig<at::native::"
        "(anonymous namespace)::OpaqueType<2u>, unsigned int, 2, 128, 1>",
        False,
        "elementwise / copies / cat / casts",
    ),
    ("Memcpy DtoD (Device -> Device)", False, "elementwise / copies / cat / casts"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", False, "NCCL"),
    (  # the router's top-k runs in an MoE layer: MoE, not the indexer's
        "void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>("
        "at::cuda::detail::TensorInfo<float const, unsigned int>, unsigned int)",
        True,
        profile_step.MOE,
    ),
    ("void at::native::index_elementwise_kernel<128, 4>", True, profile_step.MOE),
]


@pytest.mark.parametrize(("name", "in_moe", "family"), RECORDED)
def test_classifier_on_recorded_kernel_names(name: str, in_moe: bool, family: str) -> None:
    assert profile_step.classify(name, in_moe) == family


def _frame(where: str) -> list[dict]:
    return [{"filename": f"/x/indexcache_train/{where}.py", "line": 1, "name": where}]


def test_peak_allocations_replays_the_trace() -> None:
    gib = 1 << 30
    trace = [
        {"action": "alloc", "addr": 1, "size": 1 * gib, "frames": _frame("a")},
        {"action": "alloc", "addr": 2, "size": 2 * gib, "frames": _frame("b")},
        {"action": "free_completed", "addr": 1, "size": 1 * gib},
        {"action": "alloc", "addr": 3, "size": 4 * gib, "frames": _frame("b")},  # peak: 2 + 4
        {"action": "free_requested", "addr": 3, "size": 4 * gib},
        {"action": "alloc", "addr": 4, "size": 3 * gib, "frames": []},
    ]
    m = profile_step.peak_allocations(trace)
    assert (m["peak_gib"], m["oom"], m["live_at_peak"]) == (6.0, False, 2)
    assert m["by_origin"] == [{"origin": "b.py:1 b", "gib": 6.0, "count": 2}]
    assert [a["gib"] for a in m["largest"]] == [4.0, 2.0]
    oom = profile_step.peak_allocations(
        [*trace[:2], {"action": "oom", "size": 9 * gib, "frames": _frame("c")}]
    )
    assert (oom["peak_gib"], oom["oom"], oom["live_at_peak"]) == (3.0, True, 2)
    assert oom["request"] == {"gib": 9.0, "origin": "c.py:1 c"}  # what failed, not only what lived
    text = profile_step.render_memory("cell", {**oom, "static_gib": 40.0, "error": None})
    assert "OOM at 3.00 GiB allocated in the step, on top of 40.00 GiB" in text
    assert "the failed request: 9.00 GiB at c.py:1 c" in text


def test_oom_line_names_the_request_and_the_frame() -> None:
    """An OOM is reported with the allocator's message and the innermost repo frame."""
    import _common

    def indexcache_train_frame():  # a function whose file path holds no repo name: skipped
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB.")

    try:
        indexcache_train_frame()
    except torch.OutOfMemoryError as e:
        line = _common.oom_line(e)
    assert line.startswith("OOM at ?: CUDA out of memory. Tried to allocate 64.00 GiB")


def test_gpu_profile_counts_each_kernel_once() -> None:
    """A kernel counts once, under its launching op; a record_function range's device event
    (a user annotation spanning the kernels inside it) is not a kernel."""
    from types import SimpleNamespace as Ns

    from torch.autograd import DeviceType

    def cuda(name, start, end, annotation=False):
        return Ns(
            name=name, device_type=DeviceType.CUDA, time_range=Ns(start=start, end=end),
            duration=end - start, is_user_annotation=annotation,
        )  # fmt: skip

    gemm = cuda("nvjet_gemm", 0, 3000)
    op = Ns(
        name="aten::mm", device_type=DeviceType.CPU, kernels=[gemm], cpu_parent=None,
        sequence_nr=1, thread=1, is_user_annotation=False,
    )  # fmt: skip
    mark = Ns(
        name="Optimizer.step#AdamW.step", device_type=DeviceType.CPU, kernels=[],
        cpu_parent=None, sequence_nr=-1, thread=1, is_user_annotation=True,
    )  # fmt: skip
    events = [op, mark, gemm, cuda("Optimizer.step#AdamW.step", 0, 3000, annotation=True)]
    prof = profile_step.from_events(events, on_cuda=True, wall_ms=3.0)
    assert prof.total_ms == pytest.approx(3.0)
    assert [name for name, _ in prof.by_kernel] == ["nvjet_gemm"]


def test_topk_per_length() -> None:
    assert [bench_glm5_layers.topk_for("8,131072:2", s) for s in (32768, 131072)] == [8, 2]
    with pytest.raises(ValueError, match="default top-k"):
        bench_glm5_layers.topk_for("131072:2", 32768)


def test_glm5_refuses_fewer_experts_than_the_routed_top_k(capsys) -> None:
    """Before: the router's torch.topk failed in every cell ("selected index k out of range")."""
    with pytest.raises(SystemExit):
        bench_glm5_layers.main(["--experts", "6", "--seqs", "32768", "--out", "/nonexistent"])
    assert "--experts 6 is below the routed top-k 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # 131072's top-2 does not lift the 32K cells' top-8
        bench_glm5_layers.main(["--experts", "4", "--seqs", "32768,131072", "--out", "/x"])


def test_smoke_runs_every_script_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import _cells

    models: list[weakref.ref] = []  # every cell's model must be gone once the cell is over
    real_build = _cells.build

    def build(*args, **kwargs):
        built = real_build(*args, **kwargs)
        models.append(weakref.ref(built.model_chunks()[0]))
        return built

    monkeypatch.setattr(_cells, "build", build)
    assert bench_glm5_layers.main(["--smoke", "--out", str(tmp_path)]) == 0
    gc.collect()
    assert len(models) == 4 and all(m() is None for m in models)
    out = json.loads((tmp_path / "glm5_layers.json").read_text())
    cells = out["cells"]
    assert sorted(cells) == sorted(
        f"{sch}/{st}@64" for sch in ("freq4", "full") for st in ("sparse", "warmup")
    )
    assert all(
        c["tokens_per_s"] > 0 and c["flops"] > 0 and c["experts"] == 6 for c in cells.values()
    )
    shares = cells["freq4/sparse@64"]["profile"]["families"]
    assert abs(sum(v["share"] for v in shares.values()) - 1) < 1e-6
    assert shares[profile_step.MOE]["ms"] > 0 and shares["GEMMs"]["ms"] > 0
    assert "| freq4/sparse@64 | 6 | 2 |" in bench_glm5_layers.render(out)

    assert profile_step.main(["--smoke", "--stages", "sparse", "--out", str(tmp_path)]) == 0
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert prof["freq4/sparse@64"]["profile"]["kernel_ms"] > 0

    assert bench_moe_experts.main(["--smoke", "--out", str(tmp_path)]) == 0
    case = json.loads((tmp_path / "moe_experts.json").read_text())["cases"][0]
    assert case["rows"] == 64 * 4  # top-8 over 4 experts: every token to all 4
    assert case["rel_diff"] < 1e-2  # GroupedExperts computes what SequentialMLP does


@pytest.mark.parametrize(
    ("stage", "tree", "message"),
    [
        ("glm5_bas", None, "unknown stage glm5_bas"),
        ("glm5_base", "empty", "no indexcache_train in"),
        ("glm5_base", "no_data", "has no data/default/gpt2.tiktoken"),
    ],
)
def test_device_perf_refuses_bad_stages_before_any_work(tmp_path, stage, tree, message) -> None:
    """A typo or an incomplete baseline tree is refused before the device does anything (the
    first GPU run lost its before/after to a baseline unpacked without data/)."""
    import os
    import subprocess

    base = tmp_path / "baseline"
    if tree == "no_data":
        (base / "indexcache_train").mkdir(parents=True)
        (base / "indexcache_train" / "__init__.py").write_text("")
    bin_dir = tmp_path / "bin"  # a stand-in nvidia-smi that records being called
    bin_dir.mkdir()
    called = tmp_path / "called"
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\ntouch {called}\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "OUT": str(tmp_path / "out"),
        "BASELINE": str(base),
    }
    proc = subprocess.run(
        ["bash", str(BENCH / "device_perf.sh"), "glm5", stage],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stdout
    assert not called.exists()  # refused before touching the device


def test_glm5_auto_experts_back_off_after_an_oom(tmp_path, monkeypatch) -> None:
    """The planner has no measured margin (the H100 OOM'd at its 9 experts): with ``--experts
    auto`` an OOM re-runs the whole length with fewer experts, so freq 4 and all-Full are
    measured at one count; a fixed ``--experts`` is never changed."""
    import re

    plan = bench_glm5_layers.Plan(64, 2, 9, 1.0, 0.5, 1.0, 8.0, True)
    monkeypatch.setattr(bench_glm5_layers, "plan", lambda *a: plan)
    ran: list[tuple[str, int]] = []

    def fake_cell(base, cell, *rest):
        n = int(re.search(r"n_routed_experts\D+(\d+)", " ".join(base)).group(1))
        ran.append((cell.name, n))
        if n > 5:
            return bench_glm5_layers.OOM
        return {"step_s": 1.0, "tokens_per_s": 64.0, "tflops": 1.0, "mfu": 0.1, "peak_gib": 1.0}

    monkeypatch.setattr(bench_glm5_layers, "run_cell", fake_cell)
    monkeypatch.setattr(bench_glm5_layers._cells, "init_runtime", lambda base: torch.device("cpu"))
    monkeypatch.setattr(bench_glm5_layers._cells, "load_flops", lambda: None)
    parsed = bench_glm5_layers_args(["--smoke", "--profile", "", "--out", str(tmp_path)])
    parsed.experts = "auto"  # --smoke's defaults fix the count; nothing is built here anyway
    out = bench_glm5_layers.run(parsed)
    assert out["plans"][64]["experts_tried"] == [9, 7, 6]  # 9 -> 7 -> 6: two back-offs, then stop
    assert {n for _, n in ran} == {9, 7, 6}  # stops at the first OOM of each count
    assert all(isinstance(c, str) for c in out["cells"].values())  # still OOM at 6: reported

    ran.clear()
    monkeypatch.setattr(
        bench_glm5_layers,
        "plan",
        lambda *a: bench_glm5_layers.Plan(64, 2, 6, 1.0, 0.5, 1.0, 8.0, True),
    )
    out = bench_glm5_layers.run(parsed)
    assert out["plans"][64]["experts_tried"] == [6, 5]
    assert all(c["experts"] == 5 for c in out["cells"].values())  # every cell at one count
    assert len(ran) == 1 + 4  # the OOM'd cell at 6, then the length again at 5

    ran.clear()
    parsed.experts = "8"
    out = bench_glm5_layers.run(parsed)
    assert out["plans"][64]["experts_tried"] == [8] and {n for _, n in ran} == {8}
    assert len(ran) == 3  # the freq 4 sparse OOM skips only the other sparse cell


def bench_glm5_layers_args(argv: list[str]):
    """The script's parsed and checked arguments."""
    import argparse

    captured = {}

    def fake_run(args: argparse.Namespace) -> dict:
        captured["args"] = args
        return {"device": "", "package": "", "cells": {}, "plans": {}}

    real = bench_glm5_layers.run
    bench_glm5_layers.run = fake_run
    try:
        bench_glm5_layers.main(argv)
    finally:
        bench_glm5_layers.run = real
    return captured["args"]
