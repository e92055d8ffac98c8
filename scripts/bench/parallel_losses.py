"""Multi-GPU loss equivalence through ``train.py``: DP=2, TP=2+SP and CP=2 against one GPU.

Every run trains the GPU toy (``toy_gpu``: bf16, Triton/cuDNN kernels where the head dims allow,
packed documents) for the same steps across the warm-up -> sparse stage switch, starting from one
shared model checkpoint (Megatron initialises TP shards from their own RNG streams on the GPU, so
random init alone would differ by layout). Per step it compares the LM loss and the mean Full-layer
indexer loss with the one-GPU reference.

bf16 runs do not agree bit-for-bit across layouts (reduction order changes), so the tolerance is
anchored to a measured floor: the same one-GPU job with twice the micro-batches (same global batch,
same math, another summation order). A layout passes when its worst relative deviation is within
``--rtol-lm`` / ``--rtol-indexer`` (defaults below; the report prints the floor next to them).

    python scripts/bench/parallel_losses.py --out DIR [--layouts dp2,tp2sp,cp2] [--steps 20]

On a machine with fewer GPUs than a layout needs, that layout is reported as ``not run`` (never as
passed) and the exit status is 3; a failed comparison exits 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "toy_gpu"
LAYOUTS = {
    "dp2": ["parallel=dp2"],
    "tp2sp": ["parallel=tp2"],
    "cp2": ["parallel.context_parallel_size=2"],
}
#: Relative tolerances per step (bf16). The measured one-GPU floor is printed next to them.
RTOL_LM = 1e-2
RTOL_INDEXER = 5e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(root: Path, nproc: int, overrides: list[str], log: Path) -> None:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            f"--master-port={_free_port()}",
        ]
    cmd = [*launcher, "train.py", f"+experiment={EXPERIMENT}", f"run.root={root}", *overrides]
    with log.open("w") as f:
        out = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=900)
    if out.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}); log {log}:\n{tail}")


def _losses(root: Path) -> list[dict]:
    path = root / f"{EXPERIMENT}-local/metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare(ref: list[dict], got: list[dict]) -> dict:
    """Worst per-step relative deviation of the LM and indexer losses (and where it happened)."""
    if [r["step"] for r in got] != [r["step"] for r in ref]:
        raise SystemExit(f"steps differ: {[r['step'] for r in got]} vs {[r['step'] for r in ref]}")
    lm = [_rel(g["loss/lm"], r["loss/lm"]) for g, r in zip(got, ref)]
    ix = [_rel(g["loss/indexer"], r["loss/indexer"]) for g, r in zip(got, ref)]
    finite = all(math.isfinite(g["loss/lm"]) and math.isfinite(g["loss/indexer"]) for g in got)
    return {
        "steps": len(got),
        "finite": finite,
        "max_rel_lm": max(lm),
        "max_rel_lm_step": 1 + lm.index(max(lm)),
        "max_rel_indexer": max(ix),
        "max_rel_indexer_step": 1 + ix.index(max(ix)),
        "stages": sorted({g["stage"] for g in got}),
        "tokens_per_s_per_gpu": [g["throughput/tokens_per_s_per_gpu"] for g in got][-1],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "outputs/parallel")))
    ap.add_argument("--layouts", default="dp2,tp2sp,cp2")
    ap.add_argument("--steps", type=int, default=20, help="total steps (40%% warm-up, 60%% sparse)")
    ap.add_argument("--rtol-lm", type=float, default=RTOL_LM)
    ap.add_argument("--rtol-indexer", type=float, default=RTOL_INDEXER)
    args = ap.parse_args()
    layouts = [x for x in args.layouts.split(",") if x]
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown:
        ap.error(f"unknown layouts {unknown}; choose from {sorted(LAYOUTS)}")
    if args.steps < 3:
        ap.error("--steps must be >= 3 (the run crosses the stage switch)")
    import torch

    gpus = torch.cuda.device_count()
    if gpus < 1:
        raise SystemExit("parallel_losses needs a CUDA GPU (it compares the GPU path)")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    warm = max(1, round(0.4 * args.steps))
    common = [
        "data.pack_documents=true",
        f"recipe.stages.0.steps={warm}",
        f"recipe.stages.1.steps={args.steps - warm}",
        "logging.eval_iters=1",
    ]
    # The shared start: one warm-up step on one GPU, model-only checkpoint (loaded by every run).
    seed_root = out / "seed"
    _train(seed_root, 1, [*common, "checkpoint.exit_after_steps=1"], out / "seed.log")
    ckpt_dir = seed_root / f"{EXPERIMENT}-local/checkpoints"
    ckpt = ckpt_dir / (ckpt_dir / "latest").read_text().strip()
    common.append(f"checkpoint.load_pretrained={ckpt}")
    _train(out / "ref", 1, common, out / "ref.log")
    ref = _losses(out / "ref")
    # The floor: the same global batch in twice the micro-batches (the toy's default is 4 rows).
    _train(out / "floor", 1, [*common, "optim.micro_batch_size=2"], out / "floor.log")
    results: dict[str, dict] = {"floor_mbs2": compare(ref, _losses(out / "floor"))}
    status = 0
    for name in layouts:
        if gpus < 2:
            results[name] = {"not_run": f"needs 2 GPUs, this machine has {gpus}"}
            status = max(status, 3)
            continue
        _train(out / name, 2, [*common, *LAYOUTS[name]], out / f"{name}.log")
        r = compare(ref, _losses(out / name))
        r["pass"] = (
            r["finite"]
            and r["max_rel_lm"] <= args.rtol_lm
            and r["max_rel_indexer"] <= args.rtol_indexer
        )
        results[name] = r
        if not r["pass"]:
            status = 1
    report = {
        "device": torch.cuda.get_device_name(),
        "gpus": gpus,
        "steps": args.steps,
        "rtol_lm": args.rtol_lm,
        "rtol_indexer": args.rtol_indexer,
        "ref_lm_first_last": [ref[0]["loss/lm"], ref[-1]["loss/lm"]],
        "results": results,
    }
    (out / "parallel_losses.json").write_text(json.dumps(report, indent=1))
    print(
        f"device {report['device']} x{gpus}, {args.steps} steps ({warm} warm-up), "
        f"rtol lm {args.rtol_lm:g} indexer {args.rtol_indexer:g}"
    )
    print("| run | max rel. LM loss diff (step) | max rel. indexer loss diff (step) | result |")
    print("|---|---:|---:|---|")
    for name, r in results.items():
        if "not_run" in r:
            print(f"| {name} | | | not run: {r['not_run']} |")
            continue
        verdict = "floor" if name.startswith("floor") else ("pass" if r["pass"] else "FAIL")
        print(
            f"| {name} | {r['max_rel_lm']:.2e} ({r['max_rel_lm_step']}) | "
            f"{r['max_rel_indexer']:.2e} ({r['max_rel_indexer_step']}) | {verdict} |"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
