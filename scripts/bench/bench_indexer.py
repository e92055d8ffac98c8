"""Indexer scores + top-k: Triton kernel vs the chunked PyTorch reference, 4K-128K (forward only).

Reports, per sequence length: scoring alone (all query blocks, no top-k), scoring + top-k (the
API path: torch.topk sorted), the top-k share, the same with unsorted torch.topk and with the
Triton radix select (the measured alternative), TFLOP/s-equivalent of the scoring matmuls (FLOPs = 2 * I * D * S^2/2,
the causal half), peak memory, and the chunked PyTorch reference (chunk 1024) in the same run.

    python scripts/bench/bench_indexer.py [--heads 32] [--seqs 4096,8192,...] [--ref-max 65536]
"""

from __future__ import annotations

import argparse

import torch
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

from indexcache_train.ops import triton_indexer as tix
from indexcache_train.ops.indexer_reference import indexer_topk_reference
from indexcache_train.ops.triton_indexer import indexer_topk_triton, score_blocks

HEADER = [
    "seq", "scores ms", "scores TFLOP/s", "scores+topk ms", "end-to-end TFLOP/s", "topk share",
    "topk unsorted ms", "scores+radix ms", "peak GiB",
    "torch ref ms", "torch ref TFLOP/s", "torch ref peak GiB", "speedup vs ref",
]  # fmt: skip


def run_size(S: int, n_heads: int, D: int, K: int, ref_max: int) -> list[object]:
    scale = D**-0.5
    g = torch.Generator(device="cuda").manual_seed(S)
    q = torch.randn(1, S, n_heads, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, S, D, device="cuda", generator=g).bfloat16()
    w = torch.randn(1, S, n_heads, device="cuda", generator=g) * n_heads**-0.5
    flops = 2 * n_heads * D * S * S / 2

    def scores_only() -> None:
        for _ in score_blocks(q, k, w, scale, None):
            pass

    def full(select: str = "radix", sort: bool = True):
        def run() -> torch.Tensor:
            tix.SELECT = select
            return indexer_topk_triton(q, k, w, K, scale, sort=sort)

        return run

    def ref() -> torch.Tensor:
        return indexer_topk_reference(q, k, w, K, scale, None, 1024)

    def tflops(t: object) -> object:
        return flops / (t * 1e-3) / 1e12 if isinstance(t, float) else t

    t_sc = attempt(lambda: time_ms(scores_only))
    t_unsorted = attempt(lambda: time_ms(full("torch", False)))
    t_radix = attempt(lambda: time_ms(full("radix", True)))
    t_full = attempt(lambda: time_ms(full("torch", True)))
    mem = attempt(lambda: peak_gib(full("torch", True)))
    tix.SELECT = "torch"
    t_ref = mem_ref = "skipped"
    if S <= ref_max:
        t_ref = attempt(lambda: time_ms(ref, budget_ms=0, min_reps=1))
        mem_ref = attempt(lambda: peak_gib(ref))
    both = isinstance(t_full, float) and isinstance(t_sc, float)
    share = f"{100 * (t_full - t_sc) / t_full:.0f}%" if both else "-"
    speedup = t_ref / t_full if isinstance(t_ref, float) and isinstance(t_full, float) else "-"
    return [
        S, t_sc, tflops(t_sc), t_full, tflops(t_full), share, t_unsorted, t_radix, mem,
        t_ref, tflops(t_ref), mem_ref, speedup,
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--seqs", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument(
        "--ref-max", type=int, default=65536, help="largest seq for the torch reference"
    )
    args = ap.parse_args()
    rows = []
    for S in (int(s) for s in args.seqs.split(",")):
        free()
        rows.append(run_size(S, args.heads, args.dim, args.topk, args.ref_max))
        print(rows[-1], flush=True)
    title = f"Indexer top-k, B=1, {args.heads} heads x {args.dim}, k={args.topk}, causal"
    print(f"\n### {title}\ndevice: {device_line()}; commit {git_rev()}\n")
    print(table(HEADER, rows))
    print(autotune_report(tix._indexer_scores_kernel))
    raw = [dict(zip(HEADER, r)) for r in rows]
    save(f"bench_indexer_h{args.heads}", {"title": title, "device": device_line(), "rows": raw})


if __name__ == "__main__":
    main()
