"""Sparse absorbed-MLA attention over top-k indices: Triton vs stock Megatron-Core 0.19.2, 4K-128K.

Per sequence length (B=1, D = 576 = 512 + 64, v 512, k = 2048, causal duplicate-free random
indices, rows < k padded with -1): our forward and backward kernels timed separately, and
Megatron-Core 0.19.2's unfused absorbed path (``dsa._unfused_absorbed_dsa_fn``, no fused
backend: it builds fp32 ``[b, heads, s, s]`` scores) forward and forward + backward in the same
run; OOM is a result. FLOPs: forward = 2 * H * (576 + 512) * (valid slots), backward = 2.5 x
forward (the usual convention; the kernel's actual backward matmuls are 2752/1088 = 2.53 x).

    python scripts/bench/bench_sparse_mla.py [--heads 64] [--seqs ...] [--megatron-max 16384]
"""

from __future__ import annotations

import argparse

import torch
from _common import (
    OOM,
    attempt,
    autotune_report,
    device_line,
    free,
    git_rev,
    peak_gib,
    save,
    table,
    time_ms,
)

from indexcache_train.ops import triton_sparse_mla as tsm
from tests.helpers.kernel_testing import causal_topk_indices

D, V = 576, 512
BWD_DEFAULT = tsm.BWD_MODE
BWD_COMPARE = False  # --compare-bwd: also time the split (dQ launch + dKV launch) backward

HEADER = [
    "seq", "fwd ms", "fwd TFLOP/s", "bwd ms", "bwd TFLOP/s", "bwd split ms", "fwd+bwd peak GiB",
    "Megatron fwd ms", "Megatron fwd+bwd ms", "Megatron fwd+bwd TFLOP/s", "Megatron peak GiB",
]  # fmt: skip


def megatron_fn():
    from megatron.core.transformer.experimental_attention_variant.dsa import (
        _unfused_absorbed_dsa_fn,
    )

    return _unfused_absorbed_dsa_fn


def run_size(S: int, H: int, K: int, megatron_max: int) -> list[object]:
    scale = D**-0.5
    g = torch.Generator(device="cuda").manual_seed(S)
    q = torch.randn(1, S, H, D, device="cuda", generator=g).bfloat16()
    kv = torch.randn(1, S, D, device="cuda", generator=g).bfloat16()
    dout = torch.randn(1, S, H, V, device="cuda", generator=g).bfloat16()
    idx = causal_topk_indices(1, S, K, "cuda", generator=g)
    n_valid = float((idx >= 0).sum())
    fwd_flops = 2 * H * (D + V) * n_valid

    out, lse = tsm._fwd(q, kv, idx, scale, V)
    t_f = attempt(lambda: time_ms(lambda: tsm._fwd(q, kv, idx, scale, V)))

    def bwd_time(mode: str) -> object:
        tsm.BWD_MODE = mode
        return attempt(lambda: time_ms(lambda: tsm._bwd(dout, q, kv, idx, out, lse, scale, V)))

    t_split = bwd_time("split") if BWD_COMPARE else "-"
    t_b = bwd_time(BWD_DEFAULT)
    out = lse = None  # free before the memory measurement

    def ours_fb():
        ql, kvl = q.detach().requires_grad_(), kv.detach().requires_grad_()
        o, _ = tsm.sparse_mla_triton(ql, kvl, idx, scale, V)
        return torch.autograd.grad(o, (ql, kvl), dout)

    mem = attempt(lambda: peak_gib(ours_fb))
    free()

    m_f = m_fb = m_mem = "skipped"
    if S <= megatron_max:
        fn = megatron_fn()
        q_m = q.transpose(0, 1).detach().requires_grad_()  # [s, b, np, hn]
        k_m = kv.transpose(0, 1)[:, :, None].detach().requires_grad_()  # [s, b, 1, hn]
        d_m = dout.transpose(0, 1)

        def m_fwd():
            with torch.no_grad():
                return fn(q_m, k_m, idx, scale, V)

        def m_fwd_bwd():
            o = fn(q_m, k_m, idx, scale, V)
            return torch.autograd.grad(o, (q_m, k_m), d_m)

        m_f = attempt(lambda: time_ms(m_fwd, budget_ms=0, min_reps=2))
        free()
        m_fb = attempt(lambda: time_ms(m_fwd_bwd, budget_ms=0, min_reps=2)) if m_f != OOM else OOM
        free()
        m_mem = attempt(lambda: peak_gib(m_fwd_bwd)) if m_fb != OOM else OOM
        free()

    def tf(t: object, mult: float = 1.0) -> object:
        return mult * fwd_flops / (t * 1e-3) / 1e12 if isinstance(t, float) else t

    return [S, t_f, tf(t_f), t_b, tf(t_b, 2.5), t_split, mem, m_f, m_fb, tf(m_fb, 3.5), m_mem]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--seqs", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--megatron-max", type=int, default=16384)
    ap.add_argument("--compare-bwd", action="store_true")
    args = ap.parse_args()
    global BWD_COMPARE
    BWD_COMPARE = args.compare_bwd
    rows = []
    for S in (int(s) for s in args.seqs.split(",")):
        free()
        rows.append(run_size(S, args.heads, args.topk, args.megatron_max))
        print(rows[-1], flush=True)
    title = f"Sparse MLA (absorbed), B=1, {args.heads} heads, D 576, v 512, k={args.topk}, bf16"
    print(f"\n### {title}\ndevice: {device_line()}; commit {git_rev()}\n")
    print(table(HEADER, rows))
    print(autotune_report(tsm._sparse_mla_fwd_kernel, tsm._sparse_mla_bwd_kernel))
    raw = [dict(zip(HEADER, r)) for r in rows]
    save(f"bench_sparse_mla_h{args.heads}", {"title": title, "device": device_line(), "rows": raw})


if __name__ == "__main__":
    main()
