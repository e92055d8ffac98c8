"""Fused distillation loss (sparse and dense terms): Triton vs the PyTorch chunked path, 4K-128K.

Per sequence length (B=1, bf16 inputs, fp32 indexer weights, causal), each term's forward +
backward into the indexer (``ops.api`` with ``backend="triton"`` vs ``backend="torch"``, same
inputs, same process) and its peak memory. The main attention's LSE comes from our attention
kernels (sparse MLA forward / dense attention), the top-k indices are duplicate-free random keys
spread over each row's causal range (``tests/helpers/kernel_testing.causal_topk_indices``).
The PyTorch reference is timed only up to ``--ref-max`` (it takes seconds per call beyond 16K).
"Megatron [b,h,s,s] GiB" is the size of the fp32 ``[b, heads, s, s]`` score tensor stock
Megatron-Core's unfused DSA loss path builds (computed, not run: 1 TiB at 64K with 64 heads).

Useful FLOPs per valid (query, key) pair: target ``2 H Dqk`` (576 sparse), indexer logits
``2 I D``, its backward ``4 I D``.

    python scripts/bench/bench_distill.py --term sparse --heads 64 --idx-heads 32 --seqs 4096,...
    python scripts/bench/bench_distill.py --term dense --heads 64 --qk 256 --idx-heads 32
    python scripts/bench/bench_distill.py ... --profile-seq 65536  # + per-kernel CUDA times
    python scripts/bench/bench_distill.py --compile-report   # CPU: registers / spills (sm_90)
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import (
    GIB,
    OOM,
    attempt,
    autotune_report,
    device_line,
    free,
    git_rev,
    save,
    table,
    time_ms,
)

from indexcache_train.ops import api
from indexcache_train.ops import triton_distill as td
from indexcache_train.ops.masking import KeyRange
from tests.helpers.distill_testing import indexer_inputs
from tests.helpers.kernel_testing import causal_topk_indices

D_IDX = 128
HEADER = [
    "seq", "fwd+bwd ms", "useful TFLOP/s", "fwd-only ms", "target-kernel ms", "peak GiB",
    "extra GiB", "torch ref fwd+bwd ms", "torch ref peak GiB", "torch ref extra GiB",
    "speedup vs ref", "Megatron [b,h,s,s] GiB",
]  # fmt: skip


def timed_with_peak(
    fn, budget_ms: float = 400.0, min_reps: int = 3
) -> tuple[object, object, object]:
    """``(median ms, peak GiB, peak - allocated-before GiB)`` of ``fn`` (one warm-up call first)."""

    def go() -> tuple[float, float, float]:
        fn()  # warm-up: compilation, autotuning
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ms = time_ms(fn, budget_ms=budget_ms, min_reps=min_reps)
        peak = torch.cuda.max_memory_allocated()
        return ms, peak / GIB, (peak - base) / GIB

    out = attempt(go)
    return (OOM, OOM, OOM) if out == OOM else out  # type: ignore[return-value]


PROFILE_SEQ = 0  # --profile-seq: per-kernel CUDA time of one fwd+bwd call at this length


def kernel_breakdown(fn, top: int = 10) -> str:
    """Per-kernel CUDA time of one call of ``fn`` (torch.profiler; after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evs = [(e.self_device_time_total, e.count, e.key) for e in prof.key_averages()]
    evs = [e for e in evs if e[0] > 0]
    total = sum(e[0] for e in evs)
    lines = ["| kernel | calls | ms | share |", "|---|---:|---:|---:|"]
    for t, n, name in sorted(evs, reverse=True)[:top]:
        lines.append(f"| {name[:60]} | {n} | {t / 1e3:.1f} | {100 * t / total:.0f}% |")
    lines.append(f"| total (all kernels) | | {total / 1e3:.1f} | |")
    return "\n".join(lines)


def _term(term, attn: dict, leaves: list[torch.Tensor], iscale: float, **kw) -> torch.Tensor:
    q, k, w = leaves
    return term(**attn, idx_q_BSID=q, idx_k_BTD=k, idx_w_BSI=w, idx_scale=iscale, **kw)


def _grad_fn(term, attn: dict, leaves: list[torch.Tensor], iscale: float, **kw):
    def f():
        loss = _term(term, attn, leaves, iscale, **kw)
        return torch.autograd.grad(loss, leaves)

    return f


def run_sparse(S: int, H: int, I: int, K: int, ref_max: int) -> list[object]:  # noqa: E741
    from indexcache_train.ops import triton_sparse_mla as tsm

    Da = 576
    g = torch.Generator(device="cuda").manual_seed(S)
    aq = torch.randn(1, S, H, Da, device="cuda", generator=g).bfloat16()
    akv = torch.randn(1, S, Da, device="cuda", generator=g).bfloat16()
    idx = causal_topk_indices(1, S, K, "cuda", generator=g)
    ascale, iscale = Da**-0.5, D_IDX**-0.5
    lse = tsm._fwd(aq, akv, idx, ascale, 512)[1]  # the LSE the model's sparse MLA returns
    free()
    iq, ik, iw = indexer_inputs(1, S, S, I, D_IDX, "cuda", g)
    leaves = [x.requires_grad_() for x in (iq, ik, iw)]
    n_valid = float((idx >= 0).sum())
    flops = n_valid * (2 * H * Da + 6 * I * D_IDX)
    attn = dict(attn_q_BSHD=aq, attn_kv_BTD=akv, attn_lse_BSH=lse, topk_BSK=idx, attn_scale=ascale)
    ours = _grad_fn(api.sparse_distill, attn, leaves, iscale, backend="triton")
    t, peak, extra = timed_with_peak(ours)

    def fwd_only():
        with torch.no_grad():
            return _term(api.sparse_distill, attn, leaves, iscale, backend="triton")

    t_f = attempt(lambda: time_ms(fwd_only))
    t_p = attempt(lambda: time_ms(lambda: td.topk_head_probs_triton(aq, akv, lse, idx, ascale)))
    if S == PROFILE_SEQ:
        print(f"\nsparse {S}: kernels of one fwd+bwd call\n{kernel_breakdown(ours)}\n", flush=True)
    free()
    r_t = r_peak = r_extra = "skipped"
    if S <= ref_max:
        ref = _grad_fn(api.sparse_distill, attn, leaves, iscale, backend="torch")
        r_t, r_peak, r_extra = timed_with_peak(ref, budget_ms=0, min_reps=1)
        free()
    return _row(S, t, flops, t_f, t_p, peak, extra, r_t, r_peak, r_extra, H)


def run_dense(S: int, H: int, Dqk: int, I: int, ref_max: int) -> list[object]:  # noqa: E741
    g = torch.Generator(device="cuda").manual_seed(S)
    aq = torch.randn(1, S, H, Dqk, device="cuda", generator=g).bfloat16()
    ak = torch.randn(1, S, H, Dqk, device="cuda", generator=g).bfloat16()
    V = 256 if Dqk == 256 else 128
    v = torch.randn(1, S, H, V, device="cuda", generator=g).bfloat16()
    ascale, iscale = Dqk**-0.5, D_IDX**-0.5
    with torch.no_grad():
        lse = api.dense_attention(q_BSHD=aq, k_BTHD=ak, v_BTHV=v, softmax_scale=ascale)[1]
        lse = lse.contiguous()  # the model's LSE
    del v
    free()
    kr = KeyRange.causal(1, S, "cuda")
    iq, ik, iw = indexer_inputs(1, S, S, I, D_IDX, "cuda", g)
    leaves = [x.requires_grad_() for x in (iq, ik, iw)]
    flops = S * (S + 1) / 2 * (2 * H * Dqk + 6 * I * D_IDX)
    attn = dict(attn_q_BSHD=aq, attn_k_BTHD=ak, attn_lse_BSH=lse, key_range=kr, attn_scale=ascale)
    ours = _grad_fn(api.dense_distill, attn, leaves, iscale, backend="triton")
    # Long sequences take seconds per call: fewer repeats there.
    t, peak, extra = timed_with_peak(ours, budget_ms=400.0, min_reps=1 if S > 65536 else 3)

    def fwd_only():
        with torch.no_grad():
            return _term(api.dense_distill, attn, leaves, iscale, backend="triton")

    t_f = attempt(lambda: time_ms(fwd_only, min_reps=1 if S > 65536 else 3))
    if S == PROFILE_SEQ:
        print(f"\ndense {S}: kernels of one fwd+bwd call\n{kernel_breakdown(ours)}\n", flush=True)
    free()
    r_t = r_peak = r_extra = "skipped"
    if S <= ref_max:
        ref = _grad_fn(api.dense_distill, attn, leaves, iscale, backend="torch")
        r_t, r_peak, r_extra = timed_with_peak(ref, budget_ms=0, min_reps=1)
        free()
    return _row(S, t, flops, t_f, "-", peak, extra, r_t, r_peak, r_extra, H)


def _row(S, t, flops, t_f, t_p, peak, extra, r_t, r_peak, r_extra, H) -> list[object]:
    tf = flops / (t * 1e-3) / 1e12 if isinstance(t, float) else t
    speed = r_t / t if isinstance(r_t, float) and isinstance(t, float) else "-"
    megatron = H * S * S * 4 / GIB
    return [S, t, tf, t_f, t_p, peak, extra, r_t, r_peak, r_extra, speed, megatron]


def compile_report() -> None:
    """Compile each kernel config for sm_90 on the CPU; print registers, spills, shared memory."""
    from compile_report import compile_one

    f32 = ("p_ptr", "kl_ptr", "dk_ptr", "dw_ptr", "alse_ptr", "lz_ptr", "z_ptr", "klp_ptr", "g_ptr")
    types = {n: "*fp32" for n in f32} | {"qmax_ptr": "*i32", "kmin_ptr": "*i32", "inv_h": "fp32"}
    jobs = []
    for cfg in td._probs_configs():
        c = dict(DA=512, DB=64, BLOCK_H=64, SCAN=2048, ATOMIC=True, INTERP=False, **cfg.kwargs)
        jobs.append(("probs", td._topk_probs_kernel.fn, c, cfg))
    for cfg in td._kl_configs():
        for bi in (32, 64):
            for grad in (True, False):
                c = dict(D=128, BLOCK_I=bi, SCAN=2048, GRAD=grad, INTERP=False, **cfg.kwargs)
                jobs.append(("kl", td._topk_kl_kernel.fn, c, cfg))
    for cfg in td._g_configs():
        for da, db in ((256, 0), (128, 64)):
            jobs.append(
                (
                    "g",
                    td._dense_g_kernel.fn,
                    dict(DA=da, DB=db, GROUP_M=8, INTERP=False, **cfg.kwargs),
                    cfg,
                )
            )
    for cfg in td._dq_configs():
        jobs.append(("dq", td._dense_dq_kernel.fn, dict(D=128, INTERP=False, **cfg.kwargs), cfg))
    for cfg in td._dk_configs():
        c = dict(D=128, QB=td.QB_ROWS, NQB_P2=64, BLOCK_N=td.DK_BLOCK_N, INTERP=False, **cfg.kwargs)
        jobs.append(("dk", td._dense_dk_kernel.fn, c, cfg))
    for name, fn, c, cfg in jobs:
        res = compile_one(
            fn,
            c,
            cfg.num_warps,
            cfg.num_stages,
            {k: v for k, v in types.items() if k in fn.arg_names},
        )
        shown = {k: v for k, v in c.items() if k != "INTERP"}
        print(f"{name:5s} {shown} w={cfg.num_warps} s={cfg.num_stages}: {res}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--term", choices=("sparse", "dense"), default="sparse")
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--idx-heads", type=int, default=32)
    ap.add_argument("--qk", type=int, default=256, help="dense main-attention qk head dim")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--seqs", default="4096,16384,65536,131072")
    ap.add_argument("--ref-max", type=int, default=16384)
    ap.add_argument("--profile-seq", type=int, default=0)
    ap.add_argument("--compile-report", action="store_true")
    args = ap.parse_args()
    global PROFILE_SEQ
    PROFILE_SEQ = args.profile_seq
    if args.compile_report:
        compile_report()
        return
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device (or --compile-report)")
    rows = []
    for S in (int(s) for s in args.seqs.split(",")):
        free()
        if args.term == "sparse":
            rows.append(run_sparse(S, args.heads, args.idx_heads, args.topk, args.ref_max))
        else:
            rows.append(run_dense(S, args.heads, args.qk, args.idx_heads, args.ref_max))
        print(rows[-1], flush=True)
    if args.term == "sparse":
        dims = f"{args.heads} heads x 576, indexer {args.idx_heads} x 128, k={args.topk}"
    else:
        dims = f"{args.heads} heads x qk {args.qk}, indexer {args.idx_heads} x 128, causal"
    title = f"Distillation loss, {args.term} term, B=1, {dims}, bf16, fwd+bwd"
    print(f"\n### {title}\ndevice: {device_line()}; commit {git_rev()}\n")
    print(table(HEADER, rows))
    print(
        autotune_report(
            td._topk_probs_kernel, td._dense_g_kernel, td._dense_dq_kernel, td._dense_dk_kernel
        )
    )
    raw = [dict(zip(HEADER, r)) for r in rows]
    save(
        f"bench_distill_{args.term}_h{args.heads}",
        {"title": title, "device": device_line(), "rows": raw},
    )


if __name__ == "__main__":
    main()
