"""Train-step benchmark cells through the trainer's own code path (shared by the step benchmarks).

A cell is (config overrides, IndexCache schedule, recipe stage, sequence length). It composes the
typed config, builds the model chunks, wraps the stage (Megatron DDP + distributed optimizer) and
runs whole optimizer steps through ``StepRunner`` on synthetic tokens (the step time does not
depend on token values). Only public APIs that exist since commit 663449d are used, so the same
scripts measure an older package (``PYTHONPATH=.baseline``: that tree's code and configs). MFU
always uses *this* tree's FLOP model (``load_flops``), so before/after numbers divide by the same
count. Runs on CUDA, or on the CPU for the scripts' ``--smoke`` mode.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import _common
import torch
from _common import GIB, REPO, free, git_rev

#: IndexCache schedules (config overrides). freq 4 / offset 1 = FSSS..., a quarter Full.
SCHEDULES: dict[str, list[str]] = {
    "full": ["indexcache=off"],
    "freq2": ["indexcache=freq2"],
    "freq4": ["indexcache.index_topk_freq=4", "indexcache.index_skip_topk_offset=1"],
}
#: Recipe stages: the dense warm-up (frozen trunk, Full indexers by L_multi) and sparse training.
STAGES: dict[str, dict[str, Any]] = {
    "warmup": {"name": "warmup", "attention": "dense", "trainable": "indexers", "lr": 1e-3},
    "sparse": {"name": "sparse", "attention": "sparse", "trainable": "all", "lr": 3e-4},
}
#: Full activation recompute (one layer at a time) from this length on, as long-context runs do.
RECOMPUTE_FROM = 16384
RECOMPUTE = [
    "parallel.recompute_granularity=full",
    "parallel.recompute_method=uniform",
    "parallel.recompute_num_layers=1",
]


def _git(root: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    except OSError:  # no git on the machine
        return ""
    return out.stdout.strip()


def package_line() -> str:
    """Which ``indexcache_train`` is measured: its path and, when it is a checkout's root, the
    commit (a baseline tree unpacked inside this checkout has none of its own)."""
    import indexcache_train

    root = Path(indexcache_train.__file__).resolve().parents[1]
    where = "no git metadata"
    if root == REPO:
        # This checkout: the commit rule of every bench script ($IC_COMMIT on the device, whose
        # copy of .git may be stale: a GPU run once printed an old commit here).
        where = f"commit {git_rev()}"
    elif _git(root, "rev-parse", "--show-toplevel") == str(root):
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
        where = f"commit {_git(root, 'rev-parse', '--short', 'HEAD')}" + (
            "+uncommitted" if dirty else ""
        )
    return f"package {root} ({where}); FLOPs by {REPO / 'indexcache_train/training/flops.py'}"


def load_flops() -> ModuleType:
    """This tree's ``training/flops.py``, whatever package is imported (one FLOP model for all)."""
    path = REPO / "indexcache_train" / "training" / "flops.py"
    spec = importlib.util.spec_from_file_location("bench_model_flops", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def has_config_field(section: str, name: str) -> bool:
    """Whether the imported package's schema knows ``section.name`` (an older one may not)."""
    from indexcache_train.config import schema

    cls = {"model": schema.ModelSection, "parallel": schema.ParallelSection}[section]
    return name in {f.name for f in fields(cls)}


class Tokens(Iterator[dict]):
    """Endless synthetic micro-batches in the GPTDataset sample format."""

    def __init__(self, seq: int, mbs: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(seq)
        self.tokens = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        self.seq = seq

    def __next__(self) -> dict:
        t = self.tokens
        return {
            "tokens": t[:, :-1],
            "labels": t[:, 1:],
            "loss_mask": torch.ones_like(t[:, 1:], dtype=torch.float),
            "position_ids": torch.arange(self.seq).expand(t.shape[0], self.seq),
        }


@dataclass(frozen=True)
class Cell:
    """One measurement: a schedule and a stage at a sequence length."""

    schedule: str
    stage: str
    seq: int
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.schedule}/{self.stage}@{self.seq}"


def compose_cell(base: list[str], cell: Cell):
    """The typed config of ``cell`` on top of ``base`` overrides."""
    from indexcache_train.config.compose import compose

    overrides = [*base, *SCHEDULES[cell.schedule], f"model.seq_length={cell.seq}", *cell.overrides]
    if cell.seq >= RECOMPUTE_FROM:
        overrides += RECOMPUTE
    return compose(overrides)


def init_runtime(base: list[str]) -> torch.device:
    """Process group (NCCL on a GPU, gloo on the CPU), model-parallel groups, seeds."""
    from indexcache_train.config.compose import compose
    from indexcache_train.training import runtime

    device = runtime.init_process_group(runtime.discover_ranks())
    runtime.init_model_parallel(compose(base))
    runtime.seed_everything(0)
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Built:
    """A cell's model, wrapped for its stage, ready to step."""

    cfg: Any
    resolved: Any
    stage: Any
    wrapped: Any
    runner: Any
    data: Tokens
    device: torch.device
    steps_done: int = 0

    def step(self) -> None:
        """One optimizer step, as the training loop takes it."""
        from indexcache_train.training.lr import apply_lr
        from indexcache_train.training.stages import distill_settings

        apply_lr(self.wrapped.optimizer, self.stage, self.steps_done, self.cfg.optim.weight_decay)
        for c in self.wrapped.ddp_chunks:
            c.zero_grad_buffer()
        self.wrapped.optimizer.zero_grad()
        self.runner.run(
            self.wrapped.ddp_chunks,
            self.data,
            self.resolved.num_microbatches,
            attention=self.stage.attention,
            distill=distill_settings(self.cfg),
            frozen_trunk=self.stage.trainable == "indexers",
            forward_only=False,
        )
        self.wrapped.optimizer.step()
        self.steps_done += 1

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.optim.global_batch_size * self.cfg.model.seq_length

    def model_chunks(self) -> list[torch.nn.Module]:
        return [c.module for c in self.wrapped.ddp_chunks]


def build(cfg, stage_name: str, device: torch.device) -> Built:
    from indexcache_train.config.schema import StageSection
    from indexcache_train.config.validate import validate
    from indexcache_train.training.model_setup import build_chunks, wrap_stage
    from indexcache_train.training.step import StepRunner

    stage = StageSection(steps=1000, **STAGES[stage_name])
    resolved = validate(cfg, 1)
    chunks, tcfg = build_chunks(cfg, resolved.model, resolved.pipeline_layout, device)
    wrapped = wrap_stage(cfg, chunks, tcfg, stage)
    seq, mbs = cfg.model.seq_length, cfg.optim.micro_batch_size
    runner = StepRunner(resolved.model.schedule, seq, mbs, device)
    data = Tokens(seq, mbs, resolved.model.vocab_size)
    return Built(cfg, resolved, stage, wrapped, runner, data, device)


def release(built: Built | None) -> None:
    """Let a cell's model go before the next cell builds its own.

    Megatron's MoE token dispatcher keeps the last micro-batch's routing probabilities
    (``local_probs``, with their autograd graph) as attributes. The graph's nodes hold hooks
    whose closures reach the model, a cycle through C++ that ``gc`` cannot break, so every
    sparse-stage cell's model (weights, grads, Adam state) outlived it: on an H200 the second
    cell of a run held ~35 GiB of the first (``steady_gib`` 96.4 vs 60.9). Dropping those
    attributes breaks the cycle (``tests/unit/test_bench_scripts.py`` checks the model dies)."""
    if built is None:
        return
    for chunk in built.model_chunks():
        for module in chunk.modules():
            dispatcher = getattr(module, "token_dispatcher", None)
            for name, value in list(vars(dispatcher).items()) if dispatcher is not None else ():
                if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                    setattr(dispatcher, name, None)


def timed_steps(built: Built, untimed: int, timed: int) -> list[float]:
    """Wall seconds of ``timed`` steps after ``untimed`` ones (kernel compilation, autotuning);
    the peak-memory counter is reset before the first step."""
    if built.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(built.device)
    times = []
    for i in range(untimed + timed):
        synchronize(built.device)
        t0 = time.perf_counter()
        built.step()
        synchronize(built.device)
        if i >= untimed:
            times.append(time.perf_counter() - t0)
    return times


def peak_tflops(device: torch.device, flops: ModuleType) -> float | None:
    if device.type != "cuda":
        return None
    return flops.device_peak_tflops(torch.cuda.get_device_name(device))


def measure(built: Built, times: list[float], flops: ModuleType) -> dict:
    """Speed, model FLOPs (this tree's count), MFU and memory of a cell's timed steps."""
    cfg, stage, model = built.cfg, built.stage, built.resolved.model
    tokens = built.tokens_per_step
    f = flops.step_flops(
        model,
        cfg.model.seq_length,
        tokens,
        stage.attention,
        stage.trainable == "all",
        cfg.distill.mode,
    )
    dt = statistics.median(times)
    peak = peak_tflops(built.device, flops)
    out = {
        "step_s": dt,
        "steps_timed": len(times),
        "tokens_per_s": tokens / dt,
        "tflops": f.total / dt / 1e12,
        "mfu": f.total / dt / 1e12 / peak if peak else None,
        "flops": f.total,
        "flops_trunk": f.trunk,
        "flops_indexer": f.indexer,
        "flops_distill": f.distill,
    }
    if built.device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(built.device) / GIB
        out["reserved_gib"] = torch.cuda.max_memory_reserved(built.device) / GIB
        out["steady_gib"] = torch.cuda.memory_allocated(built.device) / GIB
    return out


def attempt(fn: Callable[[], dict], keep_going: bool = False) -> dict | str:
    """``fn()``, or ``"OOM"`` when the GPU runs out of memory. ``keep_going``: any other error
    becomes ``"ERROR: ..."`` (traceback printed), so one broken cell of an unattended run does
    not cost the others."""
    try:
        return _common.attempt(fn)  # type: ignore[return-value]
    except Exception as e:
        if not keep_going:
            raise
        traceback.print_exc()
        free()
        return f"ERROR: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def add_cell_args(ap: argparse.ArgumentParser, schedules: str) -> None:
    """The options every step benchmark shares (what to run, where to write)."""
    ap.add_argument("--seqs", default="32768,131072")
    ap.add_argument("--schedules", default=schedules, help=f"of {sorted(SCHEDULES)}")
    ap.add_argument("--stages", default="sparse,warmup", help=f"of {sorted(STAGES)}")
    ap.add_argument("--lm-chunk", type=int, default=8192, help="model.lm_loss_chunk (0: off)")
    ap.add_argument("--out", default=os.environ.get("OUT", "outputs/bench"))
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes (tests)")


def check_cell_args(
    ap: argparse.ArgumentParser,
    args: argparse.Namespace,
    smoke_defaults: dict,
    then: Callable[[], None] | None = None,
) -> None:
    """Refuse bad input before any compute; ``--smoke`` replaces untouched defaults. ``then``:
    the script's own argument checks, run on the final values before the device check (an
    inconsistent command is named as such, also on a machine without a GPU)."""
    for option, known in (("schedules", SCHEDULES), ("stages", STAGES)):
        for name in getattr(args, option).split(","):
            if name not in known:
                ap.error(f"--{option}: unknown {name!r}; use some of {sorted(known)}")
    if args.smoke:
        for k, v in smoke_defaults.items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    if then is not None:
        then()
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or pass --smoke for the CPU code path")
