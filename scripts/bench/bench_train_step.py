"""Train-step speed of the bench model: all-Full vs freq 2 vs freq 4, 8K-128K, one GPU.

Runs the trainer's own code path (typed config -> model chunks -> Megatron DDP + distributed
optimizer -> ``StepRunner`` with Megatron's schedule -> optimizer step), sparse stage with the
multi-layer distillation loss, bf16, full activation recompute from 16K on. Synthetic tokens (the
step time does not depend on token values). Per cell: median step time over the timed steps,
tokens/s, model TFLOP/s (``training.flops``), MFU vs the H100/H200 bf16 peak, peak memory; the
FLOP-predicted speedup of each schedule over all-Full next to the measured one. OOM is a result.

    python scripts/bench/bench_train_step.py [--seqs 8192,16384,...] [--schedules full,freq2,freq4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from _common import GIB, OOM, device_line, free, git_rev, table

SCHEDULES = {
    "full": ["indexcache=off"],
    "freq2": ["indexcache=freq2"],
    "freq4": ["indexcache.index_topk_freq=4", "indexcache.index_skip_topk_offset=1"],
}


def _cfg(schedule: str, seq: int, extra: tuple[str, ...] = ()):
    from indexcache_train.config.compose import compose

    overrides = [
        "+experiment=bench_glm5",
        *SCHEDULES[schedule],
        f"model.seq_length={seq}",
        *extra,
    ]
    if seq >= 16384:
        overrides += [
            "parallel.recompute_granularity=full",
            "parallel.recompute_method=uniform",
            "parallel.recompute_num_layers=1",
        ]
    return compose(overrides)


class _Tokens:
    """Endless synthetic micro-batches in the GPTDataset sample format."""

    def __init__(self, seq: int, mbs: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(seq)
        self.tokens = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        self.seq = seq

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        t = self.tokens
        return {
            "tokens": t[:, :-1],
            "labels": t[:, 1:],
            "loss_mask": torch.ones_like(t[:, 1:], dtype=torch.float),
            "position_ids": torch.arange(self.seq).expand(t.shape[0], self.seq),
        }


def run_cell(schedule: str, seq: int, steps: int, extra: tuple[str, ...] = ()) -> dict:
    from indexcache_train.config.validate import validate
    from indexcache_train.training.flops import device_peak_tflops, step_flops
    from indexcache_train.training.lr import apply_lr
    from indexcache_train.training.model_setup import build_chunks, wrap_stage
    from indexcache_train.training.stages import distill_settings
    from indexcache_train.training.step import StepRunner

    cfg = _cfg(schedule, seq, extra)
    resolved = validate(cfg, 1)
    device = torch.device("cuda")
    chunks, tcfg = build_chunks(cfg, resolved.model, None, device)
    stage = cfg.recipe.stages[-1]
    wrapped = wrap_stage(cfg, chunks, tcfg, stage)
    runner = StepRunner(resolved.model.schedule, seq, cfg.optim.micro_batch_size, device)
    data = _Tokens(seq, cfg.optim.micro_batch_size, resolved.model.vocab_size)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):  # the first step compiles kernels / autotunes: not timed
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        apply_lr(wrapped.optimizer, stage, i, cfg.optim.weight_decay)
        for c in wrapped.ddp_chunks:
            c.zero_grad_buffer()
        wrapped.optimizer.zero_grad()
        runner.run(
            wrapped.ddp_chunks,
            data,
            resolved.num_microbatches,
            attention="sparse",
            distill=distill_settings(cfg),
            frozen_trunk=False,
            forward_only=False,
        )
        wrapped.optimizer.step()
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    tokens = cfg.optim.global_batch_size * seq
    flops = step_flops(resolved.model, seq, tokens, "sparse", True, cfg.distill.mode)
    dt = statistics.median(times)
    peak = device_peak_tflops(torch.cuda.get_device_name()) or float("nan")
    out = {
        "schedule": schedule,
        "seq": seq,
        "step_s": dt,
        "tokens_per_s": tokens / dt,
        "tflops": flops.total / dt / 1e12,
        "mfu": flops.total / dt / 1e12 / peak,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB,
        "flops": flops.total,
        "flops_indexer": flops.indexer,
        "flops_distill": flops.distill,
    }
    del wrapped, chunks
    return out


def render(rows: dict[tuple[str, int], dict | str]) -> str:
    """The markdown table; speedups to 3 decimals (they are a few percent apart)."""
    header = [
        "schedule",
        "seq",
        "step ms",
        "tokens/s",
        "TFLOP/s",
        "MFU %",
        "peak GiB",
        "FLOP-predicted speedup",
        "measured speedup",
        "measured / predicted",
    ]
    lines = []
    for (schedule, seq), r in rows.items():
        base = rows.get(("full", seq))
        if r == OOM:
            lines.append([schedule, seq, OOM, "", "", "", "", "", "", ""])
            continue
        pred = meas = ""
        ratio = ""
        if isinstance(base, dict):
            p_, m_ = base["flops"] / r["flops"], base["step_s"] / r["step_s"]
            pred, meas, ratio = f"{p_:.3f}", f"{m_:.3f}", f"{m_ / p_:.3f}"
        lines.append(
            [
                schedule,
                seq,
                1e3 * r["step_s"],
                r["tokens_per_s"],
                r["tflops"],
                100 * r["mfu"],
                r["peak_gib"],
                pred,
                meas,
                ratio,
            ]
        )
    return table(header, lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="8192,16384,32768,65536,131072")
    ap.add_argument("--schedules", default="full,freq2,freq4")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "outputs/bench"))
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every cell, e.g. --set model.lm_loss_chunk=8192",
    )
    ap.add_argument(
        "--render", type=Path, help="print the table of a saved train_step.json, no GPU"
    )
    args = ap.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text())
        rows = {(k.split("@")[0], int(k.split("@")[1])): v for k, v in saved.items()}
        print(render(rows))
        return 0
    from indexcache_train.training import runtime

    ranks = runtime.discover_ranks()
    runtime.init_process_group(ranks)
    from indexcache_train.config.compose import compose

    runtime.init_model_parallel(compose(["+experiment=bench_glm5"]))
    runtime.seed_everything(0)
    rows: dict[tuple[str, int], dict | str] = {}
    for schedule in args.schedules.split(","):
        for seq in [int(s) for s in args.seqs.split(",")]:
            try:
                rows[(schedule, seq)] = run_cell(schedule, seq, args.steps, tuple(args.set))
            except torch.OutOfMemoryError:
                rows[(schedule, seq)] = OOM
            free()
            print(schedule, seq, rows[(schedule, seq)], flush=True)
    text = f"{device_line()} | commit {git_rev()}\n\n" + render(rows)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "train_step.md").write_text(text + "\n")
    (Path(args.out) / "train_step.json").write_text(
        json.dumps({f"{k[0]}@{k[1]}": v for k, v in rows.items()}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
