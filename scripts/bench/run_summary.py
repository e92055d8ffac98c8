"""Per-stage summary of a training run's ``metrics.jsonl``: speed, MFU, memory, loss trend.

    python scripts/bench/run_summary.py runs/NAME-JOB/metrics.jsonl [more.jsonl ...] [--json OUT]

Step time is the median over a stage's steps after its first (the first pays kernel compilation
and autotuning, and the meter's interval also holds any evaluation or checkpoint of the step
before). Peak memory is the allocator's high-water mark at the stage's last step. LM loss is the
mean of the first and of the last ``--window`` steps of the stage. No GPU or torch needed.

Each step counts once: a run that crashed and resumed may have written a step twice (the
trainer cuts ``metrics.jsonl`` back on resume, older runs did not), so the last row of a step
wins; a line a kill left half-written is skipped and reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def read_rows(path: Path) -> tuple[list[dict], int]:
    """The training rows of a ``metrics.jsonl``, one per step in step order, and how many lines
    could not be read."""
    by_step: dict[int, dict] = {}
    bad = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        if "stage" in row and "loss/lm" in row:
            by_step[step] = row  # a repeated step: the resumed run's row wins
    return [by_step[s] for s in sorted(by_step)], bad


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else float("nan")


def summarize(rows: list[dict], window: int = 5) -> list[dict]:
    stages: dict[str, list[dict]] = {}
    for r in rows:
        stages.setdefault(r["stage"], []).append(r)
    out = []
    for name, rs in stages.items():
        timed = rs[1:] or rs
        w = min(window, len(rs))
        out.append(
            {
                "stage": name,
                "steps": len(rs),
                "step_s": _median(timed, "throughput/step_time_s"),
                "tokens_per_s_per_gpu": _median(timed, "throughput/tokens_per_s_per_gpu"),
                "tflops_per_gpu": _median(timed, "throughput/tflops_per_gpu"),
                "mfu": _median(timed, "throughput/mfu"),
                "peak_gib": rs[-1].get("memory/gib"),
                "lm_first": _mean(rs[:w], "loss/lm"),
                "lm_last": _mean(rs[-w:], "loss/lm"),
                "indexer_first": _mean(rs[:w], "loss/indexer"),
                "indexer_last": _mean(rs[-w:], "loss/indexer"),
            }
        )
    return out


def _f(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def render(name: str, summary: list[dict]) -> str:
    lines = [
        f"{name}",
        "| stage | steps | step s | tokens/s/GPU | TFLOP/s/GPU | MFU % | peak GiB | LM loss first -> last | indexer loss first -> last |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for s in summary:
        mfu = "" if s["mfu"] is None else f"{100 * s['mfu']:.1f}"
        lines.append(
            f"| {s['stage']} | {s['steps']} | {_f(s['step_s'], '.3f')} "
            f"| {_f(s['tokens_per_s_per_gpu'], ',.0f')} "
            f"| {_f(s['tflops_per_gpu'], '.1f')} | {mfu} | {_f(s['peak_gib'], '.1f')} "
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
        rows, bad = read_rows(path)
        if bad:
            print(f"{path}: skipped {bad} unreadable line(s) (cut by a kill?)", file=sys.stderr)
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
