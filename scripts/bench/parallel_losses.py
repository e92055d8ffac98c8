"""Multi-device equivalence harness: every parallel layout through ``train.py`` against one device.

All jobs run ``train.py`` as a user does (``torchrun`` for several processes; NCCL and bf16 on
GPUs, gloo and fp32 on CPU, picked from the machine):

1. **ref**, one device: a pretraining stage (GPU: ``toy_gpu`` on corpus-v1, 300 steps; CPU: the
   ``toy`` on the bundled corpus, 24 steps), then the checked window: a dense warm-up and a
   sparse stage. The window starts from trained weights, so losses and gradients are far from
   the near-uniform ones of a random init, and it crosses the warm-up -> sparse switch.
2. **floor**, one device: the window again from ref's pretraining checkpoint with half-size
   micro-batches (same global batch and math, another summation order). Its deviation from ref
   is this machine's numerical noise (dtype, kernels, top-k and expert-routing flips).
3. **layouts**: the window from the same checkpoint (resharded by dist-checkpointing) as DP=2
   (distributed optimizer), TP=2+SP, CP=2 (zigzag), EP=2, PP=2 (trunk layers on both stages, a
   share group ending at the cut), TP2xCP2, TP2xPP2. Each saves a checkpoint inside the sparse
   stage, which **resume** runs continue under another layout.
4. **plants**: layouts run with a planted bug (``plant.py``); each must fail the check.

Check: per step, the relative deviation from ref of the LM loss, L_multi (``loss/indexer``), the
trunk and the indexer grad norms. A run passes when, per metric, its worst step is within
``k x`` the floor's worst step (``--k``, justified in docs/benchmarks.md; a floor never counts as
less than ``MIN_FLOOR``).

    python scripts/bench/parallel_losses.py --out DIR [--layouts dp2,tp2sp,...] [--plants all]

Exit status: 0 every run passed and every plant was caught; 1 otherwise; 3 nothing failed but
some layouts were not run (fewer GPUs than they need); 4 ``--budget-s`` ran out (the same
command with ``--reuse`` continues where it stopped). Report: ``DIR/parallel_losses.json`` and
markdown tables on stdout (on GPUs also tokens/s/GPU and peak memory per layout).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from plant import PLANTS  # noqa: E402

METRICS = ("loss/lm", "loss/indexer", "optim/grad_norm", "optim/indexer_grad_norm")
#: Tolerance = K x the floor (the measurement behind it: docs/benchmarks.md).
K = 20.0
#: A floor never counts as less than fp32's epsilon (losses and norms are fp32 sums).
MIN_FLOOR = 2.0**-23
#: Each job's run directory under its root (``run.name=run``, ``INDEXCACHE_RUN_ID=harness``).
RUN_DIR = "run-harness"
FLOOR = "floor_mbs"


@dataclass(frozen=True)
class Scale:
    """Model, data and recipe of one machine kind."""

    overrides: tuple[str, ...]
    pretrain: str
    """The pretraining stage (a ``recipe.stages`` entry)."""
    pretrain_steps: int
    warmup_steps: int
    sparse_steps: int
    timeout_s: int

    @property
    def start(self) -> int:
        """Step of ref's checkpoint every checked job resumes from (end of pretraining)."""
        return self.pretrain_steps

    @property
    def steps(self) -> int:
        return self.pretrain_steps + self.warmup_steps + self.sparse_steps

    @property
    def resume_step(self) -> int:
        """The checkpoint each layout saves (inside the sparse stage) for its resume run."""
        return self.start + self.warmup_steps + max(1, self.sparse_steps // 2)

    def recipe(self) -> str:
        window = (
            f"{{name: warmup, steps: {self.warmup_steps}, lr: 1.0e-3, attention: dense, "
            "trainable: indexers}, "
            f"{{name: sparse, steps: {self.sparse_steps}, lr: 3.0e-4, warmup_steps: 1, "
            "attention: sparse, trainable: all}"
        )
        return f"recipe.stages=[{self.pretrain}, {window}]"


SCALES = {
    "gpu": Scale(
        ("+experiment=toy_gpu", "data=corpus_v1", "data.pack_documents=true"),
        "{name: pretrain, steps: 300, lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 10, "
        "attention: sparse, trainable: all}",
        pretrain_steps=300,
        warmup_steps=4,
        sparse_steps=8,
        timeout_s=600,
    ),
    "cpu": Scale(
        ("+experiment=toy", "model.seq_length=64", "data.pack_documents=true"),
        "{name: pretrain, steps: 24, lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 3, "
        "attention: sparse, trainable: all}",
        pretrain_steps=24,
        warmup_steps=2,
        sparse_steps=4,
        timeout_s=900,
    ),
}

#: Every job, every layout. Megatron 0.19.2 scales each MTP loss by rank-local token counts per
#: micro-batch (``process_mtp_loss``), so under CP or another micro-batch size the MTP gradient
#: differs from one device's by O(1 / local tokens): an upstream convention, not what this
#: harness checks. The MTP layer still runs (its IndexCache group, PP placement, its indexer's
#: L_multi); only its LM loss is off. ``fully_reshardable``: checkpoints resume under any layout.
COMMON = (
    "run.name=run",
    "logging.eval_iters=1",
    "optim.mtp_loss_scaling_factor=0.0",
    "checkpoint.optimizer_format=fully_reshardable",
    "checkpoint.keep_last=0",
)

#: PP=2 with trunk layers on both stages: FS | FS + MTP (the share group {0, 1} ends at the cut).
PP_LAYOUT = "parallel.pipeline_layout='Et*2|t*2mL'"


@dataclass(frozen=True)
class Layout:
    nproc: int
    overrides: tuple[str, ...]
    #: The layout that resumes this one's checkpoint (another sharding of what this one splits).
    resume_as: str
    #: Extra overrides on GPUs (what users run there; the CPU cannot run them).
    gpu_overrides: tuple[str, ...] = ()


LAYOUTS = {
    "dp2": Layout(2, ("parallel=dp2",), "tp2sp"),
    "tp2sp": Layout(2, ("parallel=tp2",), "pp2"),
    "pp2": Layout(2, ("parallel=pp2", PP_LAYOUT), "ep2"),
    "ep2": Layout(
        2,
        ("parallel.expert_model_parallel_size=2",),
        "cp2",
        ("parallel.moe_token_dispatcher_type=alltoall",),
    ),
    "cp2": Layout(2, ("parallel.context_parallel_size=2",), "dp2"),
    "tp2cp2": Layout(4, ("parallel=tp2", "parallel.context_parallel_size=2"), "tp2pp2"),
    "tp2pp2": Layout(
        4, ("parallel=tp2", "parallel.pipeline_model_parallel_size=2", PP_LAYOUT), "tp2cp2"
    ),
}


class BudgetSpentError(Exception):
    """The time budget ran out; the same command with ``--reuse`` continues."""


@dataclass
class Job:
    """One ``train.py`` launch."""

    name: str
    nproc: int
    overrides: list[str]
    plant: str | None = None
    #: A checkpoint the job auto-resumes (copied into its own checkpoint directory).
    resume_from: Path | None = None
    rows: list[dict] = field(default_factory=list)
    wall_s: float = 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(job: Job, root: Path) -> list[str]:
    cmd = [sys.executable]
    if job.nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc-per-node={job.nproc}"]
        cmd += [f"--master-port={_free_port()}"]
    script = ["train.py"] if job.plant is None else ["scripts/bench/plant.py", job.plant]
    return [*cmd, *script, *job.overrides, f"run.root={root}", f"checkpoint.dir={root / 'ckpt'}"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Each job picks its own rendezvous; the run directory name is fixed (RUN_DIR).
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID"):
        env.pop(key, None)
    env["INDEXCACHE_RUN_ID"] = RUN_DIR.split("-", 1)[1]
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_job(out: Path, job: Job, timeout_s: int, reuse: bool) -> Job:
    """Launch ``job`` (or reuse an identical finished one in ``out``); fills ``job.rows``."""
    root = out / job.name
    done = root / "job.json"
    cmd = _command(job, root)
    key = [c for c in cmd if not c.startswith("--master-port=")]
    if reuse and done.is_file() and json.loads(done.read_text())["command"] == key:
        job.wall_s = json.loads(done.read_text())["wall_s"]
    else:
        if root.exists():
            shutil.rmtree(root)
        (root / "ckpt").mkdir(parents=True)
        if job.resume_from is not None:
            shutil.copytree(job.resume_from, root / "ckpt" / job.resume_from.name)
            (root / "ckpt/latest").write_text(job.resume_from.name)
        t0 = time.perf_counter()
        log = root / "train.log"
        with log.open("w") as f:
            proc = subprocess.run(
                cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s
            )
        job.wall_s = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(
                f"{job.name}: {' '.join(cmd)} exited {proc.returncode}; log {log}:\n"
                + log.read_text()[-4000:]
            )
        done.write_text(json.dumps({"command": key, "wall_s": job.wall_s}))
    job.rows = [json.loads(x) for x in (root / RUN_DIR / "metrics.jsonl").read_text().splitlines()]
    return job


def checkpoint(out: Path, job: str, step: int) -> Path:
    return out / job / "ckpt" / f"step_{step:08d}"


def relative_deviation(ref: float, got: float) -> float:
    """|got - ref| / |ref| (0 when both are 0, e.g. the trunk grad norm of a frozen trunk)."""
    if not (math.isfinite(ref) and math.isfinite(got)):
        return 0.0 if (math.isnan(ref) and math.isnan(got)) else math.inf
    if ref == got:
        return 0.0
    return abs(got - ref) / max(abs(ref), 1e-30)


def deviations(ref: list[dict], got: list[dict]) -> dict[str, dict]:
    """Per metric: the worst step's relative deviation of ``got`` from ``ref`` (by step)."""
    by_step = {r["step"]: r for r in ref}
    missing = [g["step"] for g in got if g["step"] not in by_step]
    if missing or not got:
        raise SystemExit(f"steps {missing or 'none'} logged, not matching the reference run")
    out = {}
    for m in METRICS:
        worst, step = max((relative_deviation(by_step[g["step"]][m], g[m]), g["step"]) for g in got)
        out[m] = {"max": worst, "step": step}
    return out


def judge(ref: list[dict], job: Job, floor: dict[str, float], k: float, steps: int) -> dict:
    """Deviation / (k x floor) per metric; passes when all <= 1 and every step was logged."""
    dev = deviations(ref, job.rows)
    ratio = {m: dev[m]["max"] / (k * floor[m]) for m in METRICS}
    ok = len(job.rows) == steps and all(r <= 1.0 for r in ratio.values())
    return {"deviation": dev, "ratio": ratio, "pass": ok, "steps": len(job.rows),
            "wall_s": round(job.wall_s, 1)}  # fmt: skip


def throughput(rows: list[dict], nproc: int) -> dict[str, float]:
    """Median sparse-stage step (after its first step) and rank 0's peak memory."""
    sparse = [r for r in rows if r["stage"] == "sparse"][1:] or rows
    return {
        "nproc": nproc,
        "step_s": statistics.median(r["throughput/step_time_s"] for r in sparse),
        "tokens_per_s_per_gpu": statistics.median(
            r["throughput/tokens_per_s_per_gpu"] for r in sparse
        ),
        "peak_gib": max(r["memory/gib"] for r in rows),
    }


class Harness:
    """The jobs of one call and their comparison with ref."""

    def __init__(self, args: argparse.Namespace, scale: Scale, gpus: int) -> None:
        self.args, self.scale, self.gpus = args, scale, gpus
        self.out: Path = args.out
        self.base = [*scale.overrides, *COMMON, scale.recipe(), *args.set]
        self.t0 = time.monotonic()

    def run(self, job: Job) -> Job:
        spent = time.monotonic() - self.t0
        if self.args.budget_s and spent > self.args.budget_s:
            raise BudgetSpentError(
                f"{spent:.0f} s spent (--budget-s {self.args.budget_s}) before {job.name}"
            )
        return run_job(self.out, job, self.scale.timeout_s, self.args.reuse)

    def layout_overrides(self, name: str) -> list[str]:
        lay = LAYOUTS[name]
        return [*lay.overrides, *(lay.gpu_overrides if self.gpus else ())]

    def window(self, name: str, nproc: int, extra: list[str], plant: str | None = None) -> Job:
        """The checked window from ref's pretraining checkpoint."""
        start = checkpoint(self.out, "ref", self.scale.start)
        return self.run(Job(name, nproc, [*self.base, *extra], plant, resume_from=start))

    def main(self, layouts: list[str], resumes: list[str], plants: list[str]) -> dict:
        s, k = self.scale, self.args.k
        ref = self.run(Job("ref", 1, self.base)).rows
        window = s.steps - s.start
        mbs = int(_run_config(self.out / "ref")["optim"]["micro_batch_size"])
        floor_job = self.window(FLOOR, 1, [f"optim.micro_batch_size={max(1, mbs // 2)}"])
        floor_dev = deviations(ref, floor_job.rows)
        floor = {m: max(floor_dev[m]["max"], MIN_FLOOR) for m in METRICS}
        results: dict[str, dict] = {}
        for name in layouts:
            save = [f"checkpoint.save_interval={s.resume_step}"] if name in resumes else []
            job = self.window(name, LAYOUTS[name].nproc, [*self.layout_overrides(name), *save])
            results[name] = judge(ref, job, floor, k, window)
            results[name]["throughput"] = throughput(job.rows, LAYOUTS[name].nproc)
        for name in resumes:
            target = LAYOUTS[name].resume_as
            src = checkpoint(self.out, name, s.resume_step)
            job = Job(f"{name}_to_{target}", LAYOUTS[target].nproc,
                      [*self.base, *self.layout_overrides(target)], resume_from=src)  # fmt: skip
            results[job.name] = judge(ref, self.run(job), floor, k, s.steps - s.resume_step)
        planted: dict[str, dict] = {}
        for p in plants:
            lay = PLANTS[p].layout
            job = self.window(f"plant_{p}", LAYOUTS[lay].nproc, self.layout_overrides(lay), p)
            r = judge(ref, job, floor, k, window)
            planted[p] = {**r, "layout": lay, "why": PLANTS[p].why, "caught": not r["pass"]}
        ref_rows = [r for r in ref if r["step"] > s.start]
        return {
            "k": k, "floor": floor, "floor_deviation": floor_dev,
            "pretrain_lm_first_last": [ref[0]["loss/lm"], ref[s.start - 1]["loss/lm"]],
            "window_first_last": {m: [ref_rows[0][m], ref_rows[-1][m]] for m in METRICS},
            "ref_throughput": throughput(ref_rows, 1),
            "results": results, "plants": planted,
        }  # fmt: skip


def _run_config(root: Path) -> dict:
    import yaml

    return yaml.safe_load((root / RUN_DIR / "run_config.yaml").read_text())


def main() -> int:
    args = _parse()
    args.out.mkdir(parents=True, exist_ok=True)
    scale, gpus = _scale(args)
    layouts, not_run = _select(args.layouts, gpus)
    resumes = layouts if args.resumes == "all" else _names(args.resumes, layouts, "resume")
    for n in resumes:
        if gpus and LAYOUTS[LAYOUTS[n].resume_as].nproc > gpus:
            raise SystemExit(f"{n} resumes as {LAYOUTS[n].resume_as}, which needs more GPUs")
    plants = (
        [p for p in PLANTS if PLANTS[p].layout in layouts]
        if args.plants == "all"
        else _names(args.plants, list(PLANTS), "plant")
    )
    try:
        report = Harness(args, scale, gpus).main(layouts, resumes, plants)
    except BudgetSpentError as e:
        print(f"INCOMPLETE: {e}; run the same command with --reuse to continue")
        return 4
    import torch

    report.update(device=torch.cuda.get_device_name() if gpus else "CPU (gloo, fp32)",
                  gpus=gpus, scale=scale.overrides, not_run=not_run)  # fmt: skip
    (args.out / "parallel_losses.json").write_text(json.dumps(report, indent=1))
    _print_tables(report)
    failed = [n for n, r in report["results"].items() if not r["pass"]]
    missed = [p for p, r in report["plants"].items() if not r["caught"]]
    if failed or missed:
        print(f"\nFAILED: {failed}; planted bugs not caught: {missed}")
        return 1
    return 3 if not_run else 0


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "outputs/parallel")))
    ap.add_argument("--layouts", default="all", help=f"comma list of {list(LAYOUTS)} or all")
    ap.add_argument("--resumes", default="all",
                    help="layouts whose checkpoint is resumed under another layout: all, none "
                         "or a comma list")  # fmt: skip
    ap.add_argument("--plants", default="all",
                    help=f"comma list of {list(PLANTS)}, all (those whose layout runs) or none")  # fmt: skip
    ap.add_argument("--k", type=float, default=K, help="tolerance = k x floor (%(default)s)")
    ap.add_argument("--scale", choices=["auto", *SCALES], default="auto",
                    help="gpu: toy_gpu on corpus-v1 in bf16; cpu: the toy under gloo; "
                         "auto: gpu when CUDA is there")  # fmt: skip
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra train.py override for every job (repeatable)")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=0,
                    help="launch no new job after this many seconds (exit 4; continue with "
                         "--reuse); 0: no limit")  # fmt: skip
    ap.add_argument("--reuse", action="store_true",
                    help="keep finished jobs of an earlier call into --out with the same command")  # fmt: skip
    return ap.parse_args()


def _scale(args: argparse.Namespace) -> tuple[Scale, int]:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = args.scale if args.scale != "auto" else ("gpu" if gpus else "cpu")
    if name == "gpu" and not gpus:
        raise SystemExit("--scale gpu needs a CUDA device")
    corpus = Path(os.environ.get("CORPUS_V1_DIR", "data/corpus-v1"))
    if name == "gpu" and not (corpus / "train.bin").is_file():
        raise SystemExit(
            f"the GPU scale trains on corpus-v1, not found at {corpus}: build it with "
            "`python scripts/build_default_corpus.py --full DIR` and set CORPUS_V1_DIR=DIR"
        )
    return SCALES[name], gpus


def _names(spec: str, allowed: list[str], what: str) -> list[str]:
    if spec == "none":
        return []
    names = [x for x in spec.split(",") if x]
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise SystemExit(f"unknown {what}s {unknown}; choose from {allowed}")
    return names


def _select(spec: str, gpus: int) -> tuple[list[str], dict[str, str]]:
    names = list(LAYOUTS) if spec == "all" else _names(spec, list(LAYOUTS), "layout")
    not_run = {
        n: f"needs {LAYOUTS[n].nproc} GPUs, this machine has {gpus}"
        for n in names
        if gpus and LAYOUTS[n].nproc > gpus
    }
    return [n for n in names if n not in not_run], not_run


SHORT = {"loss/lm": "LM loss", "loss/indexer": "L_multi", "optim/grad_norm": "trunk grad norm",
         "optim/indexer_grad_norm": "indexer grad norm"}  # fmt: skip


def _print_tables(report: dict) -> None:
    floor = report["floor"]
    print(f"device {report['device']}; k = {report['k']:g}; floor (one device, half-size "
          "micro-batches): " + ", ".join(f"{SHORT[m]} {floor[m]:.2e}" for m in METRICS))  # fmt: skip
    print("cells: worst relative deviation from one device / (k x floor); pass <= 1\n")
    print("| run | " + " | ".join(SHORT[m] for m in METRICS) + " | steps | result |")
    print("|---|" + "---:|" * len(METRICS) + "---:|---|")
    runs = [*report["results"].items(), *((f"plant {p}", r) for p, r in report["plants"].items())]
    for name, r in runs:
        cells = " | ".join(f"{r['deviation'][m]['max']:.1e} / {r['ratio'][m]:.3g}" for m in METRICS)
        verdict = "pass" if r["pass"] else "FAIL"
        if name.startswith("plant"):
            verdict = "caught" if r["caught"] else "NOT CAUGHT"
        print(f"| {name} | {cells} | {r['steps']} | {verdict} |")
    for name, why in report["not_run"].items():
        print(f"| {name} | not run: {why} |")
    if report["gpus"]:
        _print_throughput(report)


def _print_throughput(report: dict) -> None:
    t0 = report["ref_throughput"]
    print("\n| layout | GPUs | step s | tokens/s/GPU | vs 1 GPU | peak GiB (rank 0) |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = [("1 GPU", t0), *((n, r["throughput"]) for n, r in report["results"].items()
                             if "throughput" in r)]  # fmt: skip
    for name, t in rows:
        rel = t["tokens_per_s_per_gpu"] / t0["tokens_per_s_per_gpu"]
        print(f"| {name} | {t['nproc']} | {t['step_s']:.3f} | {t['tokens_per_s_per_gpu']:,.0f} | "
              f"{rel:.2f} | {t['peak_gib']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
