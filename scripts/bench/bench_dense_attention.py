"""Dense causal attention with LSE: our dispatch (cuDNN / Triton) vs torch SDPA, 4K-128K.

Per sequence length (B=1): torch SDPA with the cuDNN backend and (up to --eff-max) the
memory-efficient backend (the flash backend refuses qk != v), our API (cuDNN for plain causal),
our Triton kernel forced on the same causal problem, and the Triton kernel on packed documents
(``--doc`` tokens each; what SDPA cannot express without a dense mask). Forward and forward +
backward; FLOPs = 2 * H * (valid pairs) * (qk + v) forward, 3.5x that for forward + backward
(the convention of perf-anchors.md); valid pairs = S^2/2 causal, sum of doc^2/2 packed.

    python scripts/bench/bench_dense_attention.py [--heads 16 --qk 192 --v 128] [--seqs ...]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _common import (
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
from torch.nn.attention import SDPBackend, sdpa_kernel

from indexcache_train.ops import api
from indexcache_train.ops import triton_dense_attention as tda
from indexcache_train.ops.backend_triton import dense_attention_kernel
from indexcache_train.ops.masking import KeyRange
from indexcache_train.ops.triton_dense_attention import dense_attention_triton

HEADER = [
    "seq", "SDPA cuDNN fwd ms", "SDPA cuDNN fwd TFLOP/s", "SDPA eff fwd ms", "API fwd ms",
    "Triton fwd ms", "Triton fwd TFLOP/s", "Triton/cuDNN fwd",
    "SDPA cuDNN fwd+bwd ms", "SDPA cuDNN fwd+bwd TFLOP/s", "Triton fwd+bwd ms",
    "Triton fwd+bwd TFLOP/s", "Triton packed fwd+bwd TFLOP/s", "Triton peak GiB", "cuDNN peak GiB",
]  # fmt: skip


def run_size(S: int, H: int, D: int, V: int, doc: int, eff_max: int) -> list[object]:
    scale = D**-0.5
    g = torch.Generator(device="cuda").manual_seed(S)
    q, k = (torch.randn(1, S, H, D, device="cuda", generator=g).bfloat16() for _ in "qk")
    v = torch.randn(1, S, H, V, device="cuda", generator=g).bfloat16()
    dout = torch.randn(1, S, H, V, device="cuda", generator=g).bfloat16()
    for x in (q, k, v):
        x.requires_grad_()
    fwd_flops = 2 * H * (S * S / 2) * (D + V)
    n_docs = max(1, S // doc)
    starts = torch.arange(S, device="cuda") // doc * doc
    packed = KeyRange.build(1, S, "cuda", key_start_BS=starts)
    pk_flops = 2 * H * n_docs * (min(doc, S) ** 2 / 2) * (D + V)

    def sdpa(backend: SDPBackend):
        def f():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(
                    q.transpose(1, 2),
                    k.transpose(1, 2),
                    v.transpose(1, 2),
                    is_causal=True,
                    scale=scale,
                )

        return f

    def ours_api():
        return api.dense_attention(q_BSHD=q, k_BTHD=k, v_BTHV=v, softmax_scale=scale)[0]

    def triton_causal():
        return dense_attention_triton(q, k, v, scale, None)[0]

    def triton_packed():
        return dense_attention_triton(q, k, v, scale, packed)[0]

    def fb(f, transposed: bool = False):
        def run():
            out = f()
            grad = dout.transpose(1, 2) if transposed else dout
            return torch.autograd.grad(out, (q, k, v), grad)

        return run

    def tf(t: object, flops: float = fwd_flops, mult: float = 1.0) -> object:
        return mult * flops / (t * 1e-3) / 1e12 if isinstance(t, float) else t

    with torch.no_grad():
        t_cu = attempt(lambda: time_ms(sdpa(SDPBackend.CUDNN_ATTENTION)))
        t_eff = (
            attempt(lambda: time_ms(sdpa(SDPBackend.EFFICIENT_ATTENTION)))
            if S <= eff_max
            else "skipped"
        )
        t_api = attempt(lambda: time_ms(ours_api))
        t_tr = attempt(lambda: time_ms(triton_causal))
    t_cu_fb = attempt(lambda: time_ms(fb(sdpa(SDPBackend.CUDNN_ATTENTION), True)))
    t_tr_fb = attempt(lambda: time_ms(fb(triton_causal)))
    t_pk_fb = attempt(lambda: time_ms(fb(triton_packed)))
    mem_tr = attempt(lambda: peak_gib(fb(triton_causal)))
    mem_cu = attempt(lambda: peak_gib(fb(sdpa(SDPBackend.CUDNN_ATTENTION), True)))
    ratio = t_tr / t_cu if isinstance(t_tr, float) and isinstance(t_cu, float) else "-"
    return [
        S, t_cu, tf(t_cu), t_eff, t_api, t_tr, tf(t_tr), ratio,
        t_cu_fb, tf(t_cu_fb, mult=3.5), t_tr_fb, tf(t_tr_fb, mult=3.5),
        tf(t_pk_fb, pk_flops, 3.5), mem_tr, mem_cu,
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--qk", type=int, default=192)
    ap.add_argument("--v", type=int, default=128)
    ap.add_argument("--doc", type=int, default=8192, help="document length for the packed column")
    ap.add_argument("--seqs", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--eff-max", type=int, default=16384)
    args = ap.parse_args()
    probe = torch.empty(1, 256, 2, args.qk, device="cuda", dtype=torch.bfloat16)
    probe_v = torch.empty(1, 256, 2, args.v, device="cuda", dtype=torch.bfloat16)
    backend = dense_attention_kernel(probe, probe, probe_v, None)
    rows = []
    for S in (int(s) for s in args.seqs.split(",")):
        free()
        rows.append(run_size(S, args.heads, args.qk, args.v, args.doc, args.eff_max))
        print(rows[-1], flush=True)
    title = (
        f"Dense causal attention, B=1, {args.heads} heads, qk {args.qk}, v {args.v}, bf16; "
        f"API backend for plain causal: {backend}; packed docs of {args.doc}"
    )
    print(f"\n### {title}\ndevice: {device_line()}; commit {git_rev()}\n")
    print(table(HEADER, rows))
    print(autotune_report(tda._attn_fwd_kernel, tda._attn_bwd_dkdv_kernel, tda._attn_bwd_dq_kernel))
    raw = [dict(zip(HEADER, r)) for r in rows]
    save(
        f"bench_dense_qk{args.qk}_v{args.v}", {"title": title, "device": device_line(), "rows": raw}
    )


if __name__ == "__main__":
    main()
