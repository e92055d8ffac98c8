"""Proof of value of training-aware IndexCache on a CPU toy (issue #4; results in docs/LOG.md).

Three ``train.py`` jobs (subprocesses):

1. ``pov_pretrain``: an 8-layer toy trained as plain DSA (every layer Full, indexers distilling
   their own layer); its last checkpoint initialises
2. ``pov_multi`` and 3. ``pov_own_layer``: the same model switched to IndexCache freq 4 (Shared
   layers lose their indexers), dense warm-up of the Full indexers with the multi-layer loss vs
   the own-layer ablation (same steps, data and seed), then the same sparse stage.

Evaluation runs on the same held-out batches at step 0 and every ``eval_interval`` steps and
measures every served layer's KL term in both runs (``eval.jsonl``), so both are scored on the
same L_multi. Prints a results table, writes ``curves.json`` into each run directory and
``pov_results.json`` into the root, and exits 0 when the jobs ran (claims are reported, not
enforced; ``--require-claims`` makes a failed claim exit 1)::

    python scripts/experiments/proof_of_value.py                      # ~25 min on 2 CPU cores
    python scripts/experiments/proof_of_value.py --tag _f2 --stage2 indexcache=freq2  # a variant
    python scripts/experiments/proof_of_value.py --quick --root runs/pov_quick        # CI size

Every job runs with ``OMP_NUM_THREADS=1`` (the two stage-2 jobs side by side): results do not
depend on how many jobs share the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODES = ("multi", "own_layer")
#: Metrics kept in the curves (eval rows: every evaluation; train rows: every step).
EVAL_KEYS = (
    "eval/lm_loss",
    "eval/l_multi",
    "eval/shared_kl",
    "eval/shared_recall",
    "eval/full_recall",
)
TRAIN_KEYS = ("loss/lm", "loss/indexer")
#: Claims need the reduction of L_multi by the multi warm-up to reach this fraction.
L_MULTI_CUT = 0.5
#: ``--quick``: the CI-sized version (tests/functional/test_proof_of_value.py, ~2 min on 2 cores):
#: 128-token sequences, 4 per step, 70 dense pretraining steps (indexer lr 1e-3: at 3e-3 some
#: indexers died, see docs/LOG.md), 20 warm-up + 10 sparse steps, evaluation every 10 steps.
QUICK_COMMON = ["model.seq_length=128", "optim.global_batch_size=4", "logging.eval_iters=2"]
QUICK_PRETRAIN = [
    "recipe.stages=[{name: dense, steps: 70, lr: 3e-3, indexer_lr: 1e-3, warmup_steps: 5, "
    "attention: dense, trainable: all}]",
    "logging.eval_interval=0",
]
QUICK_STAGE2 = [
    "recipe.stages=[{name: warmup, steps: 20, lr: 2e-3, attention: dense, trainable: indexers}, "
    "{name: sparse, steps: 10, lr: 3e-4, attention: sparse, trainable: all}]",
    "logging.eval_interval=10",
]


def _run(
    experiment: str, root: Path, overrides: list[str], log_dir: Path, name: str | None = None
) -> float:
    """One ``train.py`` job; returns its wall time (s). Its output goes to ``<log_dir>/<name>.log``."""
    name = name or experiment
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
    # Each job is one process that picks a free rendezvous port itself; an inherited
    # MASTER_PORT (e.g. from a pytest process that initialised torch.distributed) would make
    # the two side-by-side stage-2 jobs, or the job and its parent, bind the same port.
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        f"+experiment={experiment}",
        f"run.root={root}",
        f"run.name={name}",
        *overrides,
    ]
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_dir / f"{name}.log", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"{name} failed (exit {rc}); see {log_dir / f'{name}.log'}")
    return time.perf_counter() - t0


def _run_dir(root: Path, name: str) -> Path:
    dirs = sorted(root.glob(f"{name}-*"))
    if len(dirs) != 1:
        raise RuntimeError(f"expected one run directory {root}/{name}-*, found {dirs}")
    return dirs[0]


def _finished(root: Path, name: str) -> bool:
    """The run wrote its final checkpoint (rerunning it would only print "run already complete")."""
    runs = sorted(root.glob(f"{name}-*"))
    latest = runs[0] / "checkpoints/latest" if len(runs) == 1 else None
    if latest is None or not latest.is_file():
        return False
    state = latest.parent / latest.read_text().strip() / "trainer_state.json"
    return state.is_file() and json.loads(state.read_text())["reason"] == "final"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def curves(run_dir: Path) -> dict:
    """Eval curves (one point per evaluation) and per-step training losses of one run."""
    evals = _jsonl(run_dir / "eval.jsonl")
    train = _jsonl(run_dir / "metrics.jsonl")
    out: dict = {
        "eval": {"step": [r["step"] for r in evals], "stage": [r["stage"] for r in evals]},
        "train": {"step": [r["step"] for r in train], "stage": [r["stage"] for r in train]},
    }
    for k in EVAL_KEYS:
        if all(k in r for r in evals):
            out["eval"][k] = [r[k] for r in evals]
    for k in TRAIN_KEYS:
        out["train"][k] = [r[k] for r in train]
    kl_keys = sorted({k for r in evals for k in r if k.startswith(("eval/kl/", "eval/recall/"))})
    out["eval"].update({k: [r.get(k) for r in evals] for k in kl_keys})
    return out


def summarise(runs: dict[str, dict]) -> dict:
    """The results table: start / end of the warm-up (dense evals) and end of training (sparse)."""
    table: dict[str, dict[str, float]] = {}
    for mode, c in runs.items():
        ev = c["eval"]
        warm = [i for i, s in enumerate(ev["stage"]) if s == "warmup"]
        start, end_warm, last = warm[0], warm[-1], len(ev["step"]) - 1
        assert ev["step"][start] == 0, (
            "the driver needs the step-0 evaluation (logging.eval_interval > 0)"
        )
        row = {
            "warmup_steps": ev["step"][end_warm],
            "total_steps": ev["step"][last],
            "l_multi_start": ev["eval/l_multi"][start],
            "l_multi_end_warmup": ev["eval/l_multi"][end_warm],
            "shared_kl_start": ev["eval/shared_kl"][start],
            "shared_kl_end_warmup": ev["eval/shared_kl"][end_warm],
            "shared_recall_end_warmup": ev["eval/shared_recall"][end_warm],
            "lm_loss_start": ev["eval/lm_loss"][start],
            "lm_loss_end": ev["eval/lm_loss"][last],
            "shared_kl_end": ev["eval/shared_kl"][last],
            "shared_recall_end": ev["eval/shared_recall"][last],
            "full_recall_end": ev["eval/full_recall"][last],
        }
        row["l_multi_cut"] = 1.0 - row["l_multi_end_warmup"] / row["l_multi_start"]
        table[mode] = row
    m, o = table["multi"], table["own_layer"]
    claims = {
        f"multi warm-up cuts L_multi by >= {L_MULTI_CUT:.0%}": m["l_multi_cut"] >= L_MULTI_CUT,
        "multi < own_layer: Shared-layer KL after warm-up (dense)": m["shared_kl_end_warmup"]
        < o["shared_kl_end_warmup"],
        "multi < own_layer: Shared-layer KL at the end (sparse)": m["shared_kl_end"]
        < o["shared_kl_end"],
        "multi < own_layer: held-out LM loss at the end": m["lm_loss_end"] < o["lm_loss_end"],
    }
    return {"table": table, "claims": claims}


def format_table(summary: dict) -> str:
    t = summary["table"]
    rows = [
        ("L_multi, warm-up start (dense)", "l_multi_start", "{:.4f}"),
        ("L_multi, warm-up end (dense)", "l_multi_end_warmup", "{:.4f}"),
        ("L_multi cut by the warm-up", "l_multi_cut", "{:.1%}"),
        ("Shared-layer KL, warm-up start (dense)", "shared_kl_start", "{:.4f}"),
        ("Shared-layer KL, warm-up end (dense)", "shared_kl_end_warmup", "{:.4f}"),
        ("Shared recall@k, warm-up end", "shared_recall_end_warmup", "{:.3f}"),
        ("held-out LM loss, start", "lm_loss_start", "{:.4f}"),
        ("held-out LM loss, end", "lm_loss_end", "{:.4f}"),
        ("Shared-layer KL, end (sparse)", "shared_kl_end", "{:.4f}"),
        ("Shared recall@k, end", "shared_recall_end", "{:.3f}"),
        ("Full recall@k, end", "full_recall_end", "{:.3f}"),
    ]
    lines = ["| metric | multi | own_layer |", "|---|---|---|"]
    for label, key, fmt in rows:
        lines.append(
            f"| {label} | {fmt.format(t['multi'][key])} | {fmt.format(t['own_layer'][key])} |"
        )
    lines.append("")
    lines += [f"- [{'x' if ok else ' '}] {claim}" for claim, ok in summary["claims"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--root", type=Path, default=REPO / "runs/pov", help="run root (default runs/pov)"
    )
    ap.add_argument("--common", nargs="*", default=[], help="Hydra overrides for all three jobs")
    ap.add_argument(
        "--pretrain", nargs="*", default=[], help="Hydra overrides for pov_pretrain only"
    )
    ap.add_argument(
        "--stage2", nargs="*", default=[], help="Hydra overrides for pov_multi and pov_own_layer"
    )
    ap.add_argument(
        "--tag", default="", help="suffix of the stage-2 run names (variants sharing one pretrain)"
    )
    ap.add_argument(
        "--sequential", action="store_true", help="run the two stage-2 jobs one after the other"
    )
    ap.add_argument("--require-claims", action="store_true", help="exit 1 if a claim does not hold")
    ap.add_argument(
        "--quick", action="store_true", help="the CI-sized version (QUICK_* overrides first)"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.common = [*QUICK_COMMON, *args.common]
        args.pretrain = [*QUICK_PRETRAIN, *args.pretrain]
        args.stage2 = [*QUICK_STAGE2, *args.stage2]
    root = args.root.resolve()
    t0 = time.perf_counter()
    wall = {"pov_pretrain": 0.0}
    if not _finished(root, "pov_pretrain"):  # variants (--tag) share one pretrain
        wall["pov_pretrain"] = _run(
            "pov_pretrain", root, [*args.common, *args.pretrain], root / "logs"
        )
    ckpt_root = _run_dir(root, "pov_pretrain") / "checkpoints"
    pretrained = ckpt_root / (ckpt_root / "latest").read_text().strip()
    stage2 = [*args.common, f"checkpoint.load_pretrained={pretrained}", *args.stage2]
    names = {m: f"pov_{m}{args.tag}" for m in MODES}
    with ThreadPoolExecutor(max_workers=1 if args.sequential else len(MODES)) as pool:
        futures = {
            m: pool.submit(_run, f"pov_{m}", root, stage2, root / "logs", names[m]) for m in MODES
        }
        wall.update({names[m]: f.result() for m, f in futures.items()})
    runs = {m: curves(_run_dir(root, names[m])) for m in MODES}
    runs_pre = curves(_run_dir(root, "pov_pretrain"))
    for name, c in (("pov_pretrain", runs_pre), *((names[m], runs[m]) for m in MODES)):
        (_run_dir(root, name) / "curves.json").write_text(json.dumps(c, indent=1) + "\n")
    summary = summarise(runs)
    summary["wall_s"] = {**wall, "total": time.perf_counter() - t0}
    summary["pretrained"] = str(pretrained)
    summary["overrides"] = {"common": args.common, "pretrain": args.pretrain, "stage2": args.stage2}
    (root / f"pov_results{args.tag}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(format_table(summary))
    print("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["wall_s"].items()))
    print(f"curves: {root}/*/curves.json; summary: {root}/pov_results{args.tag}.json")
    return 1 if args.require_claims and not all(summary["claims"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
