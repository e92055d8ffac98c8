"""The paper's Table 3 in miniature, with seeds (issue #24): the whole protocol in one command.

    python scripts/experiments/table3.py --out OUT                # one H100, <= 480 s wall
    python scripts/experiments/table3.py --smoke --out OUT        # CPU toy: every phase once
    bash scripts/experiments/table3.sh OUT                        # the device entry

What runs (``table3_plan.py``: the arms, budgets and step sizing):

1. **base**: ``train.py +experiment=table3_base``: plain DSA, all Full, dense pretraining then
   sparse top-k training with the own-layer loss.
2. **arms** (a)-(e) from the base checkpoint (``+experiment=table3_arm`` plus each arm's
   overrides), several ``train.py`` processes sharing the device. The arm step count is sized
   from the base's measured step times to fit the budget (or fixed with ``--arm-steps W,S``).
3. **analysis**, in this process while the arms train (``table3_analysis.py``): every finished
   checkpoint is exported to HF and evaluated on held-out documents with sparse attention (loss
   by position bucket, copy probe at distances up to the context length, Shared-layer recall);
   ``tools search`` picks arm (e)'s pattern on the base; the first (b) checkpoint is reloaded
   in ``transformers`` and its held-out loss compared with ours.
4. **report** into ``--out`` (6 files): ``results.json``, ``table.md`` (mean ± std over seeds,
   gaps to (a) in % of (a), ordering margins in seed std), ``loss_vs_steps.png``,
   ``copy_vs_distance.png``, ``protocol.log``, ``runs.tar.gz`` (every run's ``metrics.jsonl``
   / ``eval.jsonl`` / config / log and every evaluation's ``results.json``).

Two device calls (one command may run 600 s; a warm device keeps ``--work``): ``--stop-after
base`` runs 1. and the base's analysis only (status "base only", exit 0); a later call with
``--reuse-base`` finds that base by its fingerprint (``table3_base.py``: the base config with
``--base-steps``, the data) and reuses it and its cached analysis, or says why not and trains
it. The base is asked to stop (SIGTERM: it saves) at a deadline derived from ``--budget-s``.

A wall-clock guard enforces ``--budget-s``: arms still training at the arms deadline are
stopped (partial), arms that cannot finish in time are not started, analysis still queued at
the analysis deadline is reported as not run; ``results.json`` / ``table.md`` are rewritten
after every phase and run, so even an outside kill leaves the last snapshot. Exit status: 0
complete, 3 partial (the report says what is missing), 2 refused before any compute, 1 error.
Scratch (runs, checkpoints, HF exports) lives in ``--work`` (default ``runs/table3``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO)]

import table3_base  # noqa: E402
from table3_analysis import Analysis  # noqa: E402
from table3_plan import (  # noqa: E402
    ARMS,
    BASE_NAME,
    GPU_BASE_ONLY_BUDGET_S,
    Job,
    Plan,
    Sizing,
    Speeds,
    arm_jobs,
    gpu_plan,
    job_gpu_seconds,
    job_overrides,
    size_arms,
    smoke_plan,
    with_overrides,
)
from table3_report import trainer_metrics, write_plots  # noqa: E402
from table3_runtime import Launcher, Ledger, read_jsonl, tail, write_tarball  # noqa: E402

#: Data fields that say where data lives or how it is read, not what the base trains on: left
#: out of the base's fingerprint (paths differ between machines; the data's identity is hashed).
_DATA_PLACES = (
    "train_prefixes",
    "valid_prefixes",
    "prefix",
    "tokenizer",
    "cache_dir",
    "num_workers",
)

OUTPUTS = (
    "results.json",
    "table.md",
    "loss_vs_steps.png",
    "copy_vs_distance.png",
    "protocol.log",
    "runs.tar.gz",
)
#: The device machine returns files up to this size.
MAX_OUTPUT_BYTES = 16 * 2**20
#: A log in the tarball keeps at most its last this many bytes.
MAX_LOG_BYTES = 2**20
WORK_MARKER = ".table3-work"
TERMINAL = ("done", "same_as_d")
log = logging.getLogger("table3")


class RefusedError(RuntimeError):
    """An input the protocol cannot run with; the message names the fix (exit status 2)."""


class Protocol:
    """One protocol run: preflight, base, arms, analysis, report (module docstring)."""

    def __init__(self, plan: Plan, args: argparse.Namespace) -> None:
        self.plan, self.args = plan, args
        self.out: Path = args.out.resolve()
        self.work: Path = args.work.resolve()
        self.data_dir = Path(args.data_dir).resolve() if plan.mode == "gpu" else None
        self.plots = not args.no_plots
        arms = {
            k: {"label": a.label, "warmup": a.warmup, "distill": a.distill} for k, a in ARMS.items()
        }
        self.ledger = Ledger(
            self.out,
            {
                "protocol": "table3 (issue #24)",
                "mode": plan.mode,
                "status": "running",
                "budget_s": plan.budget_s,
                "started_unix": time.time(),
                "plan": asdict(plan),
                "arms": arms,
                "phases": [],
                "runs": {},
                "reference": {},
                "notes": [],
            },
        )
        env = {"CORPUS_V1_DIR": str(self.data_dir)} if self.data_dir else {}
        self.launcher = Launcher(REPO, self.work, plan.common, env)
        self.analysis = Analysis(self.ledger, self.launcher, plan, self._prefixes())
        self.sparse_stage: dict[str, Any] = {}
        #: The base's fingerprint and what it hashes (``table3_base``; set by the preflight).
        self.base_fp, self.base_inputs = "", {}

    @property
    def runs(self) -> dict[str, dict[str, Any]]:
        return self.ledger.runs

    def _prefixes(self) -> tuple[str, str]:
        if self.data_dir is not None:
            return str(self.data_dir / "train"), str(self.data_dir / "val")
        from indexcache_train.data.config import BUNDLED_CORPUS_DIR

        return str(BUNDLED_CORPUS_DIR / "train"), str(BUNDLED_CORPUS_DIR / "val")

    # ------------------------------------------------------------------ preflight
    def preflight(self) -> None:
        """Every check that can fail before compute (raises :class:`RefusedError`)."""
        plan = self.plan
        if plan.base_deadline_s <= 0:
            raise RefusedError(
                f"--budget-s {plan.budget_s:g} leaves no time for the base after the reserves "
                f"of what follows it ({plan.budget_s - plan.base_deadline_s:g} s). Fix: a "
                "larger --budget-s"
            )
        self._check_dirs()
        p = self.ledger.phase("preflight", None)
        self._check_data()
        self._check_configs()
        self._check_device()
        self._check_plots()
        self.ledger.end_phase(p, "ok")

    def _check_dirs(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        clash = [n for n in OUTPUTS if (self.out / n).exists()]
        if clash and not self.args.overwrite:
            raise RefusedError(
                f"{self.out} already holds {clash}. Fix: another --out, or --overwrite"
            )
        if self.work.exists() and any(self.work.iterdir()):
            if not (self.work / WORK_MARKER).is_file():
                raise RefusedError(
                    f"--work {self.work} is not empty and was not made by this script. Fix: "
                    "point --work at a new directory"
                )
            if not self.args.overwrite:
                raise RefusedError(
                    f"--work {self.work} holds a previous protocol run (the trainer would resume "
                    "it). Fix: --overwrite (deletes it; with --reuse-base keeps its base) or "
                    "another --work"
                )
            if self.plan.reuse_base:  # whether the base matches is decided after the preflight
                table3_base.prune(self.work, table3_base.kept_paths(self.work))
            else:
                shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / WORK_MARKER).write_text("scratch of scripts/experiments/table3.py\n")
        handler = logging.FileHandler(self.work / "protocol.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)

    def _check_data(self) -> None:
        train, val = self._prefixes()
        for prefix in (train, val):
            if not (Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()):
                raise RefusedError(
                    f"no dataset at {prefix} (.bin/.idx). Fix: python scripts/build_default_corpus.py "
                    f"--full {Path(prefix).parent} --max-train-tokens 8000000, or --data-dir"
                )
        from indexcache_train.tools.eval_cli import EvalError, load_documents

        spec = self.plan.eval
        try:
            load_documents(val, spec.docs, spec.seq + 1, 2)
        except EvalError as err:
            raise RefusedError(f"held-out documents: {err}") from None

    def _compose(self, experiment: str, overrides: list[str]) -> tuple[Any, Any]:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from indexcache_train.config.compose import compose
        from indexcache_train.config.validate import ConfigError, validate

        saved = dict(os.environ)
        os.environ.update(self.launcher.extra_env)  # CORPUS_V1_DIR, as the jobs will see it
        try:
            cfg = compose([f"+experiment={experiment}", *self.plan.common, *overrides])
            return cfg, validate(cfg, 1)
        except (ConfigError, ValueError, HydraException, OmegaConfBaseException) as err:
            raise RefusedError(f"+experiment={experiment} {overrides}: {err}") from None
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def _check_configs(self) -> None:
        """Compose and validate the base and every arm's overrides (placeholder step counts)."""
        overrides = list(self.plan.all_base_overrides)
        cfg, resolved = self._compose("table3_base", overrides)
        self.ledger.set("base_steps", [s.steps for s in cfg.recipe.stages])
        self.base_inputs = {
            "overrides": [*self.plan.common, *overrides],
            "base_steps": self.ledger.results["base_steps"],
            "seed": cfg.run.seed,
            **{
                k: asdict(getattr(cfg, k))
                for k in ("model", "indexcache", "distill", "recipe", "optim")
            },
            # How samples are cut and augmented (repeat_*); the files are data_identity's.
            "data": {k: v for k, v in asdict(cfg.data).items() if k not in _DATA_PLACES},
            **table3_base.data_identity(self._prefixes()),
        }
        self.base_fp = table3_base.fingerprint(self.base_inputs)
        self.ledger.set("base_fingerprint", self.base_fp)
        self.ledger.set(
            "model",
            {
                "seq_length": cfg.model.seq_length,
                "index_topk": resolved.model.index_topk,
                "layers": resolved.model.num_layers,
                "global_batch_size": cfg.optim.global_batch_size,
            },
        )
        arm_cfg, arm_resolved = self._compose("table3_arm", [])
        self.sparse_stage = asdict(arm_cfg.recipe.stages[-1])
        freq4 = arm_resolved.model.schedule.pattern
        self.analysis.freq4_pattern = freq4
        for job in [Job(f"probe_{k}", k, 1) for k in ARMS]:
            self._compose("table3_arm", job_overrides(job, 1, 2, 1, self.sparse_stage, freq4))
        patterns = {"a": "F" * resolved.model.num_layers, "e": "(searched)"}
        for k in ARMS:
            self.ledger.results["arms"][k]["pattern"] = patterns.get(k, freq4)

    def _check_device(self) -> None:
        import torch

        cuda = torch.cuda.is_available()
        device = {
            "name": torch.cuda.get_device_name(0) if cuda else "cpu",
            "torch": torch.__version__,
        }
        self.ledger.set("device", device)
        if self.plan.mode == "gpu" and not cuda:
            raise RefusedError("no CUDA device: the protocol needs one GPU. Fix: --smoke for CPU")
        if self.plan.mode == "gpu":
            free = shutil.disk_usage(self.work).free / 2**30
            device["disk_free_gib"] = free
            if free < 40:
                self.ledger.note(f"only {free:.0f} GiB of disk free; checkpoints may not fit")

    def _check_plots(self) -> None:
        if not self.plots:
            return
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            if self.plan.mode == "gpu":
                raise RefusedError(
                    "matplotlib is not installed: the plots need it. Fix: pip install "
                    "matplotlib, or pass --no-plots"
                ) from None
            self.plots = False
            self.ledger.note("matplotlib is not installed here: plots skipped (smoke mode)")

    # ------------------------------------------------------------------ training jobs
    def _finish_run(
        self, name: str, rc: int | None, killed: bool, why: str = "the deadline"
    ) -> str:
        """Record a finished (or stopped) job: status, steps, its trainer evaluations."""
        d = self.launcher.run_dir(name)
        rows = read_jsonl(d / "metrics.jsonl") if d else []
        trainer = trainer_metrics(read_jsonl(d / "eval.jsonl") if d else [])
        with self.ledger.lock:
            run = self.runs[name]
            run.update(trainer, wall_s=self.ledger.now() - run.pop("_t0"))
            run["steps_done"] = rows[-1]["step"] if rows else 0
            if killed:
                run["status"], run["reason"] = "partial", f"stopped at {why}"
            elif rc != 0:
                run["status"], run["reason"] = "failed", f"exit {rc}"
            elif run["steps_done"] != run["steps_total"]:
                run["status"], run["reason"] = "failed", "exited before its last step"
            else:
                run["status"] = "done"
                # The trainer's last held-out evaluation; the eval verb's numbers join it.
                run["final"] = {k: run.get(k) for k in ("l_multi", "val_lm_loss", "shared_kl")}
        if run["status"] == "failed":
            log.info("%s failed:\n%s", name, tail(self.launcher.logs / f"{name}.log"))
        log.info(
            "%s: %s (%s/%s steps, %.0f s)",
            name, run["status"], run["steps_done"], run["steps_total"], run["wall_s"],
        )  # fmt: skip
        return run["status"]

    def obtain_base(self) -> bool:
        """The base for the arms: reused from the work dir (``--reuse-base``: a marker with
        this call's fingerprint and a complete base), else trained (resumed from its own
        checkpoint when a previous call stopped it at its deadline). True when it is done."""
        if self.plan.reuse_base:
            marker, why = table3_base.reusable(self.work, self.base_fp, self.base_inputs)
            if marker is not None and marker.get("complete"):
                p = self.ledger.phase("base", None)
                self.ledger.note(f"--reuse-base: {why}: not retrained")
                reason = f"reused: trained by an earlier call (fingerprint {self.base_fp})"
                self.ledger.update_run(BASE_NAME, **{**marker["run"], "reason": reason})
                self.ledger.end_phase(p, "reused")
                return True
            if marker is None:
                table3_base.discard(self.work)
                self.ledger.note(f"--reuse-base: {why}: training the base in this call")
            else:
                self.ledger.note(f"--reuse-base: {why}: resuming it from its checkpoint")
                return self.run_base(marker["run"].get("wall_s") or 0.0)
        return self.run_base()

    def run_base(self, earlier_wall_s: float = 0.0) -> bool:
        """Train the base; at its deadline (``plan.base_deadline_s``) ask it to stop (it saves).
        ``earlier_wall_s``: the wall time of the calls it resumes (its overhead estimate)."""
        plan = self.plan
        p = self.ledger.phase("base", plan.base_deadline_s - self.ledger.now())
        steps = sum(self.ledger.results["base_steps"])
        self.ledger.update_run(
            BASE_NAME,
            arm="base",
            seed=None,
            status="running",
            steps_total=steps,
            _t0=self.ledger.now() - earlier_wall_s,
        )
        overrides = list(plan.all_base_overrides)
        proc, logfile = self.launcher.launch(BASE_NAME, "table3_base", overrides)
        killed = False
        try:
            proc.wait(timeout=max(1.0, plan.base_deadline_s - self.ledger.now()))
        except subprocess.TimeoutExpired:
            killed = True
            self.launcher.stop(proc, plan.stop_grace_s)  # it saves: the next call resumes it
        finally:  # also on SIGTERM: never leave a job behind
            if proc.poll() is None:
                self.launcher.kill(proc)
            logfile.close()
        status = self._finish_run(BASE_NAME, proc.returncode, killed, "its deadline")
        if status in ("done", "partial"):
            self._mark_base(status == "done")
        if status != "done":
            self.ledger.note("the base did not finish: no arm can start")
        self.ledger.end_phase(p, "ok" if status == "done" else status)
        return status == "done"

    def _mark_base(self, complete: bool) -> None:
        """Keep only the base's last checkpoint and write its marker (``table3_base``)."""
        from indexcache_train.training.checkpointing import latest

        final, _ = latest(self.launcher.run_dir(BASE_NAME) / "checkpoints")
        if final is None:
            self.ledger.note("the base left no complete checkpoint: nothing to reuse")
            return
        for d in final.parent.glob("step_*"):  # the arms (and a resume) load only the last one
            if d != final:
                shutil.rmtree(d, ignore_errors=True)
        with self.ledger.lock:
            run = {k: v for k, v in self.runs[BASE_NAME].items() if not k.startswith("_")}
        table3_base.write_marker(
            self.work, self.base_fp, self.base_inputs, complete=complete,
            steps_done=table3_base.checkpoint_step(final), run=run,
        )  # fmt: skip

    def base_checkpoint(self) -> Path:
        from indexcache_train.training.checkpointing import latest

        ckpt, _ = latest(self.launcher.run_dir(BASE_NAME) / "checkpoints")
        if ckpt is None:
            raise RuntimeError("the base finished but left no complete checkpoint")
        return ckpt

    def measured_speeds(self) -> Speeds:
        """Median dense / sparse step time of the base, and its time outside steps."""
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "run_summary", REPO / "scripts/bench/run_summary.py"
        )
        run_summary = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(run_summary)
        rows = read_jsonl(self.launcher.run_dir(BASE_NAME) / "metrics.jsonl")
        stages = {s["stage"]: s["step_s"] for s in run_summary.summarize(rows)}
        stepped = sum(r["throughput/step_time_s"] for r in rows)
        return Speeds(
            stages["dense"], stages["sparse"], max(0.0, self.runs[BASE_NAME]["wall_s"] - stepped)
        )

    # ------------------------------------------------------------------ the arms
    def run_arms(self) -> None:
        """Size the arms, then keep ``concurrency`` of them training until all ran or the arms
        deadline (running ones are stopped: partial; unstarted ones: not run)."""
        plan = self.plan
        p = self.ledger.phase("arms", plan.arms_deadline_s - self.ledger.now())
        jobs = arm_jobs(plan)
        speeds, sizing = self._size(jobs)
        base_ckpt = self.base_checkpoint()
        for job in jobs:
            steps = sizing.sparse + (sizing.warmup if ARMS[job.arm].warmup else 0)
            self.ledger.update_run(
                job.name, arm=job.arm, seed=job.seed, status="pending", steps_total=steps
            )
        pending, running = list(jobs), {}
        try:
            self._schedule(pending, running, speeds, sizing, base_ckpt)
        finally:  # on SIGTERM (or an error): never leave a job behind
            if running or pending:
                self._stop_all(running, pending, "the protocol's interruption")
        done = all(r["status"] in TERMINAL for r in self.runs.values())
        self.ledger.end_phase(p, "ok" if done else "incomplete")

    def _schedule(
        self, pending: list[Job], running: dict, speeds: Speeds, sizing: Sizing, base_ckpt: Path
    ) -> None:
        """Start ready jobs while slots are free and they can finish in time; record finished
        ones and hand them to the analysis; stop everything at the arms deadline."""
        plan = self.plan
        while pending or running:
            for name, (proc, job, logfile) in list(running.items()):
                if proc.poll() is not None:
                    logfile.close()
                    del running[name]
                    if self._finish_run(name, proc.returncode, False) == "done":
                        self._analyse(job, sizing)
                    self.ledger.snapshot()
            if self.ledger.now() >= plan.arms_deadline_s:
                self._stop_all(running, pending)
                return
            while len(running) < plan.concurrency and (job := self._next_ready(pending)):
                pending.remove(job)
                gpu = job_gpu_seconds(plan, speeds, job.arm, sizing.warmup, sizing.sparse)
                finish = self.ledger.now() + speeds.overhead_s + gpu * (len(running) + 1)
                if finish > plan.arms_deadline_s:
                    self._not_run(
                        job.name, f"predicted to end at {finish:.0f} s, after the deadline"
                    )
                    continue
                overrides = job_overrides(
                    job, sizing.warmup, sizing.sparse, sizing.interval, self.sparse_stage,
                    self.analysis.search_pattern,
                )  # fmt: skip
                overrides.append(f"checkpoint.load_pretrained={base_ckpt}")
                self.ledger.update_run(job.name, status="running", _t0=self.ledger.now())
                proc, logfile = self.launcher.launch(job.name, "table3_arm", overrides)
                running[job.name] = (proc, job, logfile)
            time.sleep(0.5)

    def _size(self, jobs: list[Job]) -> tuple[Speeds, Sizing]:
        speeds = self.measured_speeds()
        window = self.plan.arms_deadline_s - self.ledger.now()
        sizing = size_arms(self.plan, speeds, window, jobs)
        self.ledger.set("sizing", {**sizing.as_dict(), "speeds": asdict(speeds)})
        if not sizing.fits:
            self.ledger.note(
                f"even {sizing.warmup} + {sizing.sparse} arm steps are predicted to take "
                f"{sizing.predicted_s:.0f} s of a {window:.0f} s window: the tail may be cut"
            )
        log.info("arms sized: %s", self.ledger.results["sizing"])
        return speeds, sizing

    def _stop_all(self, running: dict, pending: list[Job], why: str = "the arms deadline") -> None:
        for name, (proc, _, logfile) in running.items():
            self.launcher.kill(proc)
            logfile.close()
            self._finish_run(name, None, True, why)
        running.clear()
        for job in pending:
            self._not_run(job.name, f"{why} came before it could start")
        pending.clear()

    def _not_run(self, name: str, reason: str, status: str = "not_run") -> None:
        self.ledger.update_run(name, status=status, reason=reason)
        log.info("%s: %s (%s)", name, status, reason)

    def _next_ready(self, pending: list[Job]) -> Job | None:
        """The first pending job that can start. (e) waits for the search; when the search
        failed its jobs do not run, and when it found freq 4's own pattern (e) is (d) (trained
        anyway when ``plan.train_e_if_same``)."""
        state, pattern = self.analysis.search_state, self.analysis.search_pattern
        for job in list(pending):
            if job.arm != "e":
                return job
            if state == "failed":
                pending.remove(job)
                self._not_run(job.name, "the pattern search failed")
            elif (
                state == "done"
                and pattern == self.analysis.freq4_pattern
                and not self.plan.train_e_if_same
            ):
                pending.remove(job)
                self._not_run(
                    job.name,
                    f"the searched pattern is freq 4's ({pattern}): (e) = (d)",
                    "same_as_d",
                )
            elif state == "done":
                return job
        return None

    def _analyse(self, job: Job, sizing: Sizing) -> None:
        from indexcache_train.training.checkpointing import latest, step_dir

        root = self.launcher.run_dir(job.name) / "checkpoints"
        warm = None
        if ARMS[job.arm].warmup and self.plan.warmup_end_eval:
            warm = step_dir(root, sizing.warmup)
            warm = warm if warm.is_dir() else None
        self.analysis.run_finished(job.name, job.arm, warm, latest(root)[0])

    # ------------------------------------------------------------------ tail and report
    def drain(self) -> bool:
        """Wait for the analysis until its deadline; True when everything queued ran."""
        p = self.ledger.phase("analysis tail", self.plan.analysis_deadline_s - self.ledger.now())
        left = self.analysis.pool.wait(lambda: self.ledger.now() >= self.plan.analysis_deadline_s)
        if left:
            self.ledger.note(f"analysis not finished at the deadline (not run or cut: {left})")
        self.ledger.end_phase(p, "deadline" if left else "ok")
        return not left

    def finish(self, status: str) -> None:
        self.ledger.set("status", status)
        self.ledger.snapshot()
        if self.plots:
            try:
                with self.ledger.lock:
                    write_plots(self.ledger.results, self.runs, self.out)
            except Exception as err:  # the numbers are in results.json
                self.ledger.note(f"plots failed: {err}")
                self.ledger.snapshot()
        write_tarball(self.out / "runs.tar.gz", self.launcher.runs_root, self.work, MAX_LOG_BYTES)
        shutil.copyfile(self.work / "protocol.log", self.out / "protocol.log")
        for name in OUTPUTS:
            path = self.out / name
            if path.is_file() and path.stat().st_size > MAX_OUTPUT_BYTES:
                log.info(
                    "%s is %d bytes: over the %d the device returns",
                    name,
                    path.stat().st_size,
                    MAX_OUTPUT_BYTES,
                )


# ---------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, required=True, help="report directory (6 files)")
    ap.add_argument(
        "--work",
        type=Path,
        default=REPO / "runs/table3",
        help="scratch: runs, checkpoints, exports (default runs/table3)",
    )
    ap.add_argument("--smoke", action="store_true", help="CPU toy: every phase once, 1 seed")
    ap.add_argument(
        "--data-dir",
        default=os.environ.get("CORPUS_V1_DIR", str(REPO / ".devdata/corpus_v1")),
        help="corpus-v1 slice with train/val prefixes (default $CORPUS_V1_DIR, else .devdata/corpus_v1)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        help="wall-clock budget of the whole protocol (default 480; smoke 600)",
    )
    ap.add_argument(
        "--arm-steps", help="W,S: fix the arms' warm-up and sparse steps instead of sizing them"
    )
    ap.add_argument(
        "--base-steps", help="D,S: the base's dense and sparse stage steps (default: the config's)"
    )
    ap.add_argument("--seeds", help="comma list of seeds for (a)-(d) (default 1,2,3)")
    ap.add_argument("--arms", help=f"comma list of the arms to train (default {','.join(ARMS)})")
    ap.add_argument(
        "--stop-after",
        choices=("base",),
        help="base: train the base, run its analysis (search, evaluations), report, exit 0 "
        f"(device budget {GPU_BASE_ONLY_BUDGET_S:g} s)",
    )
    ap.add_argument(
        "--reuse-base",
        action="store_true",
        help="reuse the base in --work when its fingerprint matches (with its cached analysis); "
        "with --overwrite the base is kept. Else (missing, mismatched) it is trained",
    )
    ap.add_argument("--concurrency", type=int, help="training jobs at once (default 3; smoke 2)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib)")
    ap.add_argument("--overwrite", action="store_true", help="replace outputs / a previous --work")
    return ap.parse_args(argv)


def build_plan(args: argparse.Namespace) -> Plan:
    """The mode's plan with the CLI's changes (checked: RefusedError names the flag)."""
    plan = smoke_plan() if args.smoke else gpu_plan()
    changes: dict[str, Any] = {"reuse_base": args.reuse_base, "stop_after": args.stop_after}
    if args.stop_after:
        ignored = [f for f in ("arm_steps", "arms", "seeds") if getattr(args, f)]
        if ignored:
            flags = ", ".join("--" + f.replace("_", "-") for f in ignored)
            raise RefusedError(
                f"--stop-after base trains no arm: {flags} would be ignored. Fix: drop them"
            )
        if not args.smoke:
            changes["budget_s"] = GPU_BASE_ONLY_BUDGET_S
    if args.budget_s is not None:
        changes["budget_s"] = args.budget_s
    if args.arm_steps:
        w, s = _int_pair("--arm-steps", args.arm_steps, "W,S (e.g. 12,12)")
        if w < 1 or s < 2:
            raise RefusedError(f"--arm-steps {args.arm_steps}: W must be >= 1 and S >= 2")
        changes["arm_steps"] = (w, s)
    if args.base_steps:
        d, s = _int_pair("--base-steps", args.base_steps, "D,S (e.g. 240,40)")
        if d < 1 or s < 1:
            raise RefusedError(f"--base-steps {args.base_steps}: D and S must be >= 1")
        changes["base_steps"] = (d, s)
    if args.arms:
        arms = tuple(args.arms.split(","))
        if not arms or set(arms) - set(ARMS) or len(set(arms)) != len(arms):
            raise RefusedError(
                f"--arms {args.arms!r}: expected distinct arms from {','.join(ARMS)} (e.g. a,b)"
            )
        changes["arms"] = tuple(k for k in ARMS if k in arms)
    if args.seeds:
        try:
            seeds = tuple(int(x) for x in args.seeds.split(","))
        except ValueError:
            raise RefusedError(
                f"--seeds {args.seeds!r}: expected a comma list of integers"
            ) from None
        if len(set(seeds)) != len(seeds):
            raise RefusedError(f"--seeds {args.seeds}: repeated seed")
        changes["seeds"] = seeds
    if args.concurrency is not None:
        if args.concurrency < 1:
            raise RefusedError("--concurrency must be >= 1")
        changes["concurrency"] = args.concurrency
    return with_overrides(plan, **changes)


def _int_pair(flag: str, value: str, expected: str) -> tuple[int, int]:
    """``"12,12"`` -> (12, 12); RefusedError naming ``flag`` otherwise."""
    try:
        a, b = (int(x) for x in value.split(","))
    except ValueError:
        raise RefusedError(f"{flag} {value!r}: expected {expected}") from None
    return a, b


def _run(proto: Protocol) -> str:
    """The phases after the preflight; returns the final status."""
    if not proto.obtain_base():
        return "partial"
    proto.analysis.start_base(proto.base_checkpoint(), BASE_NAME, proto.base_fp)
    if proto.plan.stop_after == "base":
        drained = proto.drain()
        return "base only" if drained and proto.analysis.base_done() else "partial"
    proto.run_arms()
    drained = proto.drain()
    complete = drained and all(r["status"] in TERMINAL for r in proto.runs.values())
    return "complete" if complete else "partial"


class TerminatedError(RuntimeError):
    """SIGTERM (an outer time limit): stop the jobs, write what finished."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise TerminatedError("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s table3 %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        proto = Protocol(build_plan(args), args)
        proto.preflight()
    except RefusedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    status = "failed"
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        status = _run(proto)
    except TerminatedError:
        proto.ledger.note("stopped by SIGTERM: what finished is reported")
        status = "partial"
    except Exception as err:  # still write what finished
        log.info("protocol error: %s\n%s", err, traceback.format_exc())
        proto.ledger.note(f"protocol error: {err}")
    finally:
        signal.signal(signal.SIGTERM, previous)
        proto.finish(status)
    print(f"{status}: {proto.out / 'table.md'}", flush=True)
    code = {"complete": 0, "base only": 0, "partial": 3}.get(status, 1)
    if not proto.analysis.pool.idle():
        os._exit(code)  # an analysis step is still running past the deadline: do not wait
    return code


if __name__ == "__main__":
    sys.exit(main())
