"""The training job: ``run(cfg)`` from a composed, typed config to a finished run.

Order of a run (everything that can be refused is refused before the model exists): validate,
process groups, resume point (config compared with the checkpoint's), datasets (files checked),
model, checkpoint or pretrained weights, then the step loop and the end-of-run summary.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state as ps

from indexcache_train.config.compose import to_yaml
from indexcache_train.config.schema import TrainConfig
from indexcache_train.config.validate import Resolved, validate
from indexcache_train.training import checkpointing as ckpt
from indexcache_train.training import runtime
from indexcache_train.training.console import end_of_run_summary, setup_logging
from indexcache_train.training.evaluation import eval_line, evaluate
from indexcache_train.training.flops import device_peak_tflops
from indexcache_train.training.loggers import MetricsLogger, last_row, make_logger
from indexcache_train.training.model_setup import Wrapped, build_chunks, switch_stage, wrap_stage
from indexcache_train.training.moe_metrics import ExpertLoadTracker
from indexcache_train.training.nonfinite import NonFiniteGuard
from indexcache_train.training.observability import Throughput, step_line
from indexcache_train.training.resume import ResumePoint, find_resume_point, prepare_run_dir
from indexcache_train.training.signals import StopRequest
from indexcache_train.training.stages import StagePosition, position
from indexcache_train.training.step import StepRunner
from indexcache_train.training.update import train_step

log = logging.getLogger("indexcache_train")


@dataclass
class Job:
    """Everything the step loop reads and advances."""

    cfg: TrainConfig
    resolved: Resolved
    device: torch.device
    out_dir: Path
    ckpt_root: Path
    is_logging_rank: bool
    wrapped: Wrapped
    wrap_index: int
    tcfg: Any
    expert_load: ExpertLoadTracker
    runner: StepRunner
    train_iter: Any
    valid_ds: Any
    meter: Throughput
    logger: MetricsLogger
    step: int
    consumed: int
    guard: NonFiniteGuard
    stop: StopRequest = field(default_factory=StopRequest)
    metrics: dict[str, float] = field(default_factory=dict)
    steps_this_process: int = 0
    checkpoint: Path | None = None

    @property
    def total(self) -> int:
        return self.cfg.total_steps


def run(cfg: TrainConfig) -> dict[str, float]:
    """Train; returns the last step's metrics (rank 0; other ranks the same values)."""
    ranks = runtime.discover_ranks()
    setup_logging(ranks.rank)
    world = cfg.run.world_size if cfg.run.dry_run and cfg.run.world_size else ranks.world_size
    resolved = validate(cfg, world)
    if cfg.run.dry_run:
        from indexcache_train.training.dry_run import dry_run

        return dry_run(cfg, resolved)
    device = runtime.init_process_group(ranks)
    runtime.init_model_parallel(cfg)
    runtime.seed_everything(cfg.run.seed)
    out_dir = runtime.run_dir(cfg)
    ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else out_dir / "checkpoints"
    point = find_resume_point(cfg, ckpt_root)
    if ranks.rank == 0:
        prepare_run_dir(cfg, out_dir, ckpt_root, point)
        _log_setup(cfg, resolved)
    if point.step >= cfg.total_steps:
        if ranks.rank == 0:
            log.info("run already complete (%d/%d steps)", point.step, cfg.total_steps)
            log.info(_summary_of(cfg, point, out_dir))
        return {}
    job = _build(cfg, resolved, ranks.rank == 0, device, out_dir, ckpt_root, point)
    job.stop.install()
    try:
        _train(job)
    finally:
        job.stop.uninstall()
    return _finish(job)


def _log_setup(cfg: TrainConfig, resolved: Resolved) -> None:
    log.info("resolved config:\n%s", to_yaml(cfg))
    log.info("schedule: %s", resolved.model.schedule.describe())
    if resolved.pipeline_layout:
        log.info("pipeline layout: %s", resolved.pipeline_layout)


def _datasets(cfg: TrainConfig):
    """Train/validation datasets; their files are checked here, before the model is built."""
    from indexcache_train.data import build_datasets

    gbs = cfg.optim.global_batch_size
    eval_runs = (
        cfg.total_steps // cfg.logging.eval_interval if cfg.logging.eval_interval else 0
    ) + 1
    return build_datasets(
        cfg.data,
        seq_length=cfg.model.seq_length,
        train_samples=cfg.total_steps * gbs,
        valid_samples=eval_runs * cfg.logging.eval_iters * gbs,
        seed=cfg.run.seed,
    )


def _train_iterator(cfg: TrainConfig, resolved: Resolved, train_ds, consumed: int):
    from indexcache_train.data import build_dataloader

    loader = build_dataloader(
        train_ds,
        cfg.optim.micro_batch_size,
        consumed,
        data_parallel_rank=ps.get_data_parallel_rank(),
        data_parallel_size=resolved.data_parallel_size,
        num_workers=cfg.data.num_workers,
    )
    return iter(loader)


def _runner(cfg: TrainConfig, resolved: Resolved, device: torch.device) -> StepRunner:
    eod = None
    if cfg.data.pack_documents:
        from indexcache_train.data import load_tokenizer

        eod = load_tokenizer(cfg.data.tokenizer_path()).eod
    return StepRunner(
        resolved.model.schedule,
        cfg.model.seq_length,
        cfg.optim.micro_batch_size,
        device,
        cp_size=ps.get_context_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
        packed_eod=eod,
    )


def _build(
    cfg: TrainConfig,
    resolved: Resolved,
    is_logging_rank: bool,
    device: torch.device,
    out_dir: Path,
    ckpt_root: Path,
    point: ResumePoint,
) -> Job:
    """Datasets, model, weights (checkpoint or pretrained), optimizer, sinks: a ready job."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    train_ds, valid_ds = _datasets(cfg)
    chunks, tcfg = build_chunks(cfg, resolved.model, resolved.pipeline_layout, device)
    if point.directory is None and cfg.checkpoint.load_pretrained:
        ckpt.load_model_only(Path(cfg.checkpoint.load_pretrained), chunks)
    # Wrap for the stage whose optimizer wrote the checkpoint (a stage-end checkpoint belongs to
    # the stage that just finished); the loop switches stages when the next step needs it.
    wrap_index = point.state.stage_index if point.state else 0
    expert_load = ExpertLoadTracker(chunks, resolved.model, finalize_model_grads)
    wrapped = wrap_stage(cfg, chunks, tcfg, cfg.recipe.stages[wrap_index], expert_load)
    if point.directory is not None:
        ckpt.load(point.directory, [c.module for c in wrapped.ddp_chunks], wrapped.optimizer)
        log.info(
            "resumed from %s (step %d, %d samples)",
            point.directory,
            point.step,
            point.consumed_samples,
        )
    peak = cfg.logging.peak_tflops or (
        device_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    )
    resume_step = point.step if point.directory is not None else -1
    return Job(
        cfg=cfg,
        resolved=resolved,
        device=device,
        out_dir=out_dir,
        ckpt_root=ckpt_root,
        is_logging_rank=is_logging_rank,
        wrapped=wrapped,
        wrap_index=wrap_index,
        tcfg=tcfg,
        expert_load=expert_load,
        runner=_runner(cfg, resolved, device),
        train_iter=_train_iterator(cfg, resolved, train_ds, point.consumed_samples),
        valid_ds=valid_ds,
        meter=Throughput(torch.distributed.get_world_size(), peak),
        logger=make_logger(cfg, out_dir, resume_step, dataclasses.asdict(cfg), is_logging_rank),
        step=point.step,
        consumed=point.consumed_samples,
        guard=NonFiniteGuard(cfg.optim.on_nonfinite, cfg.optim.max_consecutive_skips),
        checkpoint=point.directory,
    )


def _train(job: Job) -> None:
    """Steps until the recipe ends, a stop is agreed, or ``exit_after_steps``."""
    cfg = job.cfg
    if cfg.logging.eval_interval and job.step == 0:
        _evaluate(job, position(cfg, 0))  # baseline before the first update
    while job.step < job.total:
        pos = position(cfg, job.step)
        _enter_stage(job, pos)
        metrics = train_step(
            cfg,
            job.resolved,
            job.wrapped,
            job.runner,
            job.train_iter,
            pos,
            job.step,
            job.meter,
            job.device,
            job.guard,
        )
        metrics.update(job.expert_load.metrics(job.device))
        job.step += 1
        job.steps_this_process += 1
        job.consumed += cfg.optim.global_batch_size
        _record_step(job, pos, metrics)
        if cfg.logging.eval_interval and job.step % cfg.logging.eval_interval == 0:
            if job.step < job.total:  # the final evaluation runs in _finish
                metrics.update(_evaluate(job, pos))
        job.metrics = metrics
        reason = _save_reason(job, pos)
        if reason:
            _save(job, pos, reason)
            if reason == "signal" or _exit_requested(job):
                break


def _enter_stage(job: Job, pos: StagePosition) -> None:
    if pos.index == job.wrap_index:
        return
    job.wrapped = switch_stage(job.cfg, job.wrapped, job.tcfg, pos.stage, job.expert_load)
    job.wrap_index = pos.index
    log.info(
        "stage switch at step %d -> %s (trainable: %s, attention: %s)",
        job.step,
        pos.stage.name,
        pos.stage.trainable,
        pos.stage.attention,
    )


def _record_step(job: Job, pos: StagePosition, metrics: dict[str, float]) -> None:
    if job.is_logging_rank and (
        job.step % job.cfg.logging.log_interval == 0 or job.step == job.total
    ):
        eta = job.meter.eta_s(job.total - job.step)
        log.info(step_line(job.step, job.total, pos.stage.name, metrics, eta))
    job.logger.log("train", job.step, pos.stage.name, metrics)


def _evaluate(job: Job, pos: StagePosition) -> dict[str, float]:
    metrics = evaluate(job.cfg, job.resolved, job.wrapped, job.runner, job.valid_ds, pos)
    if metrics:
        job.logger.log("eval", job.step, pos.stage.name, metrics)
        if job.is_logging_rank:
            log.info(eval_line(job.step, metrics))
    return metrics


def _exit_requested(job: Job) -> bool:
    n = job.cfg.checkpoint.exit_after_steps
    return bool(n) and job.steps_this_process >= n


def _save_reason(job: Job, pos: StagePosition) -> str | None:
    if job.stop.agreed(job.device):
        return "signal"
    if job.step == job.total:
        return "final"
    if pos.is_last_step_of_stage:
        return "stage_end"
    if _exit_requested(job):
        return "exit_after_steps"
    interval = job.cfg.checkpoint.save_interval
    if interval and job.step % interval == 0:
        return "interval"
    return None


def _stage_end_steps(cfg: TrainConfig) -> list[int]:
    out, s = [], 0
    for st in cfg.recipe.stages:
        s += st.steps
        out.append(s)
    return out


def _checkpoint_files(cfg: TrainConfig, resolved: Resolved) -> dict[str, str]:
    from checkpoint_tools.megatron_dir import MODEL_CONFIG_NAME, model_config_yaml

    # The same model_config.yaml `checkpoint_tools import` writes: `export` reads trainer
    # checkpoints directly.
    model = resolved.model
    return {
        ckpt.RUN_CONFIG_FILE: to_yaml(cfg),
        MODEL_CONFIG_NAME: model_config_yaml(model.to_hf_config(), model),
    }


def _save(job: Job, pos: StagePosition, reason: str) -> None:
    state = ckpt.TrainerState(
        job.step, pos.index, job.consumed, reason, job.cfg.checkpoint.optimizer_format
    )
    job.checkpoint = ckpt.save(
        job.ckpt_root,
        [c.module for c in job.wrapped.ddp_chunks],
        job.wrapped.optimizer,
        state,
        _checkpoint_files(job.cfg, job.resolved),
    )
    stage_ends = {ckpt.step_dir(job.ckpt_root, s).name for s in _stage_end_steps(job.cfg)}
    ckpt.apply_retention(job.ckpt_root, job.cfg.checkpoint.keep_last, stage_ends)
    if job.is_logging_rank:
        log.info("saved %s (%s)", job.checkpoint, reason)


def _finish(job: Job) -> dict[str, float]:
    """Final evaluation (when the recipe is done), sinks closed, summary on the logging rank."""
    if job.step == job.total:
        job.metrics.update(_evaluate(job, position(job.cfg, job.total - 1)))
    job.logger.finish()
    if job.is_logging_rank:
        log.info(
            end_of_run_summary(
                step=job.step,
                total=job.total,
                metrics=job.metrics,
                checkpoint=job.checkpoint,
                out_dir=job.out_dir,
                stopped_early=job.step < job.total,
            )
        )
    return job.metrics


def _summary_of(cfg: TrainConfig, point: ResumePoint, out_dir: Path) -> str:
    """The summary of a run that was already complete, from its last rows on disk."""
    metrics = {**last_row(out_dir / "metrics.jsonl"), **last_row(out_dir / "eval.jsonl")}
    return end_of_run_summary(
        step=point.step,
        total=cfg.total_steps,
        metrics=metrics,
        checkpoint=point.directory,
        out_dir=out_dir,
        stopped_early=False,
    )
