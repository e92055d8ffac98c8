"""Train-step speed of the bench model: all-Full vs freq 2 vs freq 4, 8K-128K, one GPU.

Runs the trainer's own code path (typed config -> model chunks -> Megatron DDP + distributed
optimizer -> ``StepRunner`` with Megatron's schedule -> optimizer step), sparse stage with the
multi-layer distillation loss, bf16, full activation recompute from 16K on (``_cells``). Per
cell: median step time over the timed steps, tokens/s, model TFLOP/s (``training.flops``), MFU vs
the H100/H200 bf16 peak, peak memory; the FLOP-predicted speedup of each schedule over all-Full
next to the measured one. OOM is a result.

    python scripts/bench/bench_train_step.py [--seqs 8192,16384,...] [--schedules full,freq2,freq4]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import _cells
import torch
from _common import OOM, device_line, table

BASE = ["+experiment=bench_glm5"]


def run_cell(schedule: str, seq: int, steps: int, extra: tuple[str, ...] = ()) -> dict:
    """One sparse-stage cell: median of ``steps`` timed steps after one untimed."""
    cell = _cells.Cell(schedule, "sparse", seq, extra)
    built = _cells.build(_cells.compose_cell(BASE, cell), "sparse", torch.device("cuda"))
    out = _cells.measure(built, _cells.timed_steps(built, 1, steps), _cells.load_flops())
    _cells.release(built)
    return {"schedule": schedule, "seq": seq, **out}


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
    _cells.init_runtime(BASE)
    rows: dict[tuple[str, int], dict | str] = {}
    for schedule in args.schedules.split(","):
        for seq in [int(s) for s in args.seqs.split(",")]:
            rows[(schedule, seq)] = _cells.attempt(
                lambda schedule=schedule, seq=seq: run_cell(
                    schedule, seq, args.steps, tuple(args.set)
                )
            )
            _cells.free()
            print(schedule, seq, rows[(schedule, seq)], flush=True)
    text = f"{device_line()} | {_cells.package_line()}\n\n" + render(rows)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "train_step.md").write_text(text + "\n")
    (Path(args.out) / "train_step.json").write_text(
        json.dumps({f"{k[0]}@{k[1]}": v for k, v in rows.items()}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
