"""Sparse absorbed-MLA attention over top-k indices: our variants vs the previous kernel, 4K-128K.

Per sequence length and index pattern (B=1, D = 576 = 512 + 64, v 512, k = 2048, bf16), forward
and backward timed separately for each variant:

* ``per-row``: one program per (query row, head group) (``ROW_BLOCK_MODE="off"``); at <= 32 heads
  its backward is one fused launch;
* ``row-block``: one program per block of ``64 / heads`` rows over the union of their selections
  (``"force"``; only below 64 heads);
* ``auto``: what the model runs (row-block where the plan's gain clears the thresholds), plan
  build included;
* ``per-row-det`` / ``row-block-det``: the deterministic backward of each (dKV rows to a partial
  buffer, reduced per key in a fixed order; forward unchanged);
* ``old``: the kernel module of an earlier tree (``--baseline DIR``: ``DIR/indexcache_train/ops/
  triton_sparse_mla.py`` loaded under another name), so before/after come from one process.

Index patterns (``--patterns``): ``random`` (duplicate-free stratified random keys: neighbouring
rows share almost nothing, the L2-unfriendly worst case), ``corr<c>`` (correlated scores, rows of a
block share keys; ``tests/helpers/sparse_indices.py``), ``file:PATH`` (indices saved by
``capture_topk.py`` from a trained indexer, the realistic case; ``file:PATH@LAYER`` picks a layer;
the first ``--seqs`` rows are used).
The ``gain`` column is the row-block plan's (valid slots / union entries at 4 rows per block).

FLOPs: forward = 2 * H * (576 + 512) * (valid slots); backward = 2.5 x forward (the usual
convention; the split backward executes 3.5x, the fused one 2.53x).

    python scripts/bench/bench_sparse_mla.py --heads 16 --seqs 32768 --patterns random,corr0.9
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch
from _common import attempt, autotune_report, device_line, free, git_rev, save, table, time_ms

from indexcache_train.ops import triton_sparse_mla as tsm
from tests.helpers.kernel_testing import causal_topk_indices
from tests.helpers.sparse_indices import correlated_topk_indices

D, V = 576, 512
HEADER = [
    "seq", "pattern", "gain", "variant", "fwd ms", "fwd TFLOP/s", "bwd ms", "bwd TFLOP/s",
    "fwd+bwd ms", "plan ms",
]  # fmt: skip


def load_baseline(root: Path):
    """The sparse MLA kernel module of an earlier tree, imported under its own name."""
    path = root / "indexcache_train" / "ops" / "triton_sparse_mla.py"
    spec = importlib.util.spec_from_file_location("baseline_triton_sparse_mla", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_indices(pattern: str, S: int, K: int, H: int, gen: torch.Generator) -> torch.Tensor:
    if pattern == "random":
        return causal_topk_indices(1, S, K, "cuda", generator=gen)
    if pattern.startswith("corr"):
        c = float(pattern[4:])
        return correlated_topk_indices(1, S, K, c, 4, "cuda", generator=gen)
    if pattern.startswith("file:"):  # file:PATH@LAYER (capture_topk.py's {layer: idx})
        path, _, layer = pattern[5:].partition("@")
        saved = torch.load(path, map_location="cuda")
        idx = saved[int(layer)] if layer else next(iter(saved.values()))
        return idx[:, :S, :K].to(torch.int32).contiguous()
    raise SystemExit(f"unknown index pattern {pattern!r}: random, corr<c>, file:PATH")


def run_variant(variant: str, q, kv, idx, dout, old) -> list[object]:
    scale = D**-0.5
    mod, mode = (old, None) if variant == "old" else (tsm, variant.removesuffix("-det"))
    det = variant.endswith("-det")
    if mode is not None:
        tsm.ROW_BLOCK_MODE = {"per-row": "off", "row-block": "force", "auto": "auto"}[mode]
    tsm._PLAN_CACHE.clear()

    def plan():
        return tsm.row_block_plan(idx, q.shape[2]) if mod is tsm else None

    def pick(p, gain_min):
        return p if mod is tsm and tsm._use_plan(p, gain_min) else None

    p = plan()
    t_plan = "-"
    if mod is tsm and variant == "auto" and p is not None:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tsm._PLAN_CACHE.clear()
        p = plan()
        torch.cuda.synchronize()
        t_plan = (time.perf_counter() - t0) * 1e3
    fwd_args = (q, kv, idx, scale, V) + (
        (pick(p, tsm.ROW_BLOCK_MIN_GAIN_FWD),) if mod is tsm else ()
    )
    out, lse = mod._fwd(*fwd_args)
    t_f = attempt(lambda: time_ms(lambda: mod._fwd(*fwd_args)))
    bwd_args = (dout, q, kv, idx, out, lse, scale, V)
    bwd_args += (pick(p, tsm.ROW_BLOCK_MIN_GAIN_BWD), det) if mod is tsm else ()
    t_b = attempt(lambda: time_ms(lambda: mod._bwd(*bwd_args)))
    return [t_f, t_b, t_plan]


def run_size(S: int, H: int, K: int, pattern: str, variants: list[str], old) -> list[list[object]]:
    g = torch.Generator(device="cuda").manual_seed(S)
    q = torch.randn(1, S, H, D, device="cuda", generator=g).bfloat16()
    kv = torch.randn(1, S, D, device="cuda", generator=g).bfloat16()
    dout = torch.randn(1, S, H, V, device="cuda", generator=g).bfloat16()
    idx = make_indices(pattern, S, K, H, g)
    S = idx.shape[1]
    q, dout = q[:, :S], dout[:, :S]
    n_valid = float((idx >= 0).sum())
    fwd_flops = 2 * H * (D + V) * n_valid
    plan = tsm.build_row_block_plan(idx, 4)
    rows = []
    for variant in variants:
        if variant.startswith("row-block") and tsm.rows_per_block(H) < 2:
            continue
        if variant == "old" and old is None:
            continue
        t_f, t_b, t_plan = run_variant(variant, q, kv, idx, dout, old)

        def tf(t: object, mult: float = 1.0) -> object:
            return mult * fwd_flops / (t * 1e-3) / 1e12 if isinstance(t, float) else t

        both = t_f + t_b if isinstance(t_f, float) and isinstance(t_b, float) else "-"
        rows.append(
            [
                S,
                pattern.split("/")[-1],
                plan.gain,
                variant,
                t_f,
                tf(t_f),
                t_b,
                tf(t_b, 2.5),
                both,
                t_plan,
            ]
        )
        print(rows[-1], flush=True)
        free()
    tsm.ROW_BLOCK_MODE = "auto"
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--seqs", default="8192,32768")
    ap.add_argument("--patterns", default="random,corr0.9")
    ap.add_argument("--variants", default="old,per-row,row-block,auto")
    ap.add_argument("--baseline", type=Path, default=None, help="earlier tree for the 'old' rows")
    args = ap.parse_args()
    old = load_baseline(args.baseline) if args.baseline else None
    variants = args.variants.split(",")
    rows = []
    for pattern in args.patterns.split(","):
        for S in (int(s) for s in args.seqs.split(",")):
            free()
            rows += run_size(S, args.heads, args.topk, pattern, variants, old)
    title = f"Sparse MLA (absorbed), B=1, {args.heads} heads, D 576, v 512, k={args.topk}, bf16"
    print(f"\n### {title}\ndevice: {device_line()}; commit {git_rev()}\n")
    print(table(HEADER, rows))
    print(autotune_report(tsm._sparse_mla_fwd_kernel, tsm._sparse_mla_bwd_kernel))
    raw = [dict(zip(HEADER, r)) for r in rows]
    save(f"bench_sparse_mla_h{args.heads}", {"title": title, "device": device_line(), "rows": raw})


if __name__ == "__main__":
    main()
