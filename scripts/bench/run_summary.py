"""Per-stage summary of a training run's ``metrics.jsonl``: speed, MFU, memory, loss trend.

    python scripts/bench/run_summary.py runs/NAME-JOB/metrics.jsonl [more.jsonl ...] [--json OUT]

Step time is the median over a stage's steps after its first (the first pays kernel compilation
and autotuning, and the meter's interval also holds any evaluation or checkpoint of the step
before). Peak memory is the allocator's high-water mark at the stage's last step. LM loss is the
mean of the first and of the last ``--window`` steps of the stage. No GPU or torch needed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def summarize(rows: list[dict], window: int = 5) -> list[dict]:
    stages: dict[str, list[dict]] = {}
    for r in rows:
        stages.setdefault(r["stage"], []).append(r)
    out = []
    for name, rs in stages.items():
        timed = rs[1:] or rs
        dt = statistics.median(r["throughput/step_time_s"] for r in timed)
        med = lambda key, ts=timed: statistics.median(r[key] for r in ts if key in r)  # noqa: E731
        w = min(window, len(rs))
        out.append(
            {
                "stage": name,
                "steps": len(rs),
                "step_s": dt,
                "tokens_per_s_per_gpu": med("throughput/tokens_per_s_per_gpu"),
                "tflops_per_gpu": med("throughput/tflops_per_gpu"),
                "mfu": med("throughput/mfu") if any("throughput/mfu" in r for r in timed) else None,
                "peak_gib": rs[-1]["memory/gib"],
                "lm_first": statistics.fmean(r["loss/lm"] for r in rs[:w]),
                "lm_last": statistics.fmean(r["loss/lm"] for r in rs[-w:]),
                "indexer_first": statistics.fmean(r["loss/indexer"] for r in rs[:w]),
                "indexer_last": statistics.fmean(r["loss/indexer"] for r in rs[-w:]),
            }
        )
    return out


def render(name: str, summary: list[dict]) -> str:
    lines = [
        f"{name}",
        "| stage | steps | step s | tokens/s/GPU | TFLOP/s/GPU | MFU % | peak GiB | LM loss first -> last | indexer loss first -> last |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for s in summary:
        mfu = "" if s["mfu"] is None else f"{100 * s['mfu']:.1f}"
        lines.append(
            f"| {s['stage']} | {s['steps']} | {s['step_s']:.3f} | {s['tokens_per_s_per_gpu']:,.0f} "
            f"| {s['tflops_per_gpu']:.1f} | {mfu} | {s['peak_gib']:.1f} "
            f"| {s['lm_first']:.3f} -> {s['lm_last']:.3f} "
            f"| {s['indexer_first']:.3f} -> {s['indexer_last']:.3f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("metrics", nargs="+", type=Path)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the summaries here")
    args = ap.parse_args()
    every = {}
    for path in args.metrics:
        if not path.is_file():
            ap.error(f"{path}: no such metrics file (a run writes RUN_DIR/metrics.jsonl)")
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        rows = [r for r in rows if "stage" in r and "loss/lm" in r]
        if not rows:
            ap.error(f"{path}: no training steps in it")
        every[str(path)] = summarize(rows, args.window)
        print(render(str(path), every[str(path)]))
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(every, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
