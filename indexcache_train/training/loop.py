"""The training job: ``run(cfg)`` from a composed, typed config to a finished run."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from indexcache_train.config.compose import to_yaml
from indexcache_train.config.schema import TrainConfig
from indexcache_train.config.validate import Resolved, validate
from indexcache_train.training import checkpointing as ckpt
from indexcache_train.training import runtime
from indexcache_train.training.flops import device_peak_tflops, step_flops
from indexcache_train.training.lr import apply_lr
from indexcache_train.training.model_setup import Wrapped, build_chunks, switch_stage, wrap_stage
from indexcache_train.training.moe_metrics import ExpertLoadTracker
from indexcache_train.training.observability import Throughput, make_logger, memory_gib, step_line
from indexcache_train.training.stages import distill_settings, position
from indexcache_train.training.step import StepRunner, eval_metrics, multi_loss_by_full_layer

log = logging.getLogger("indexcache_train")


@dataclass
class _Stop:
    """SIGTERM only sets a flag (a rank may get it twice: from Slurm and from torchrun); all ranks
    agree at the next step boundary, save, and exit."""

    requested: bool = False
    previous: dict = field(default_factory=dict)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        force=True,
    )
    # Megatron logs every DDP bucket and optimizer setting at INFO; keep the step lines readable.
    logging.getLogger("megatron").setLevel(logging.WARNING)


def _data(cfg: TrainConfig, resolved: Resolved, consumed: int, dp_rank: int):
    from indexcache_train.data import build_dataloader, build_datasets

    o = cfg.optim
    total_samples = cfg.total_steps * o.global_batch_size
    eval_runs = (
        cfg.total_steps // cfg.logging.eval_interval if cfg.logging.eval_interval else 0
    ) + 1
    valid_samples = eval_runs * cfg.logging.eval_iters * o.global_batch_size
    train_ds, valid_ds = build_datasets(
        cfg.data,
        seq_length=cfg.model.seq_length,
        train_samples=total_samples,
        valid_samples=valid_samples,
        seed=cfg.run.seed,
    )
    loader = build_dataloader(
        train_ds,
        o.micro_batch_size,
        consumed,
        data_parallel_rank=dp_rank,
        data_parallel_size=resolved.data_parallel_size,
        num_workers=cfg.data.num_workers,
    )
    return iter(loader), valid_ds


def _files(cfg: TrainConfig, resolved: Resolved) -> dict[str, str]:
    from checkpoint_tools.megatron_dir import MODEL_CONFIG_NAME, model_config_yaml

    # The same model_config.yaml `checkpoint_tools import` writes: `export` reads trainer
    # checkpoints directly.
    model = resolved.model
    return {
        "run_config.yaml": to_yaml(cfg),
        MODEL_CONFIG_NAME: model_config_yaml(model.to_hf_config(), model),
    }


def run(cfg: TrainConfig) -> dict[str, float]:
    """Train; returns the last step's metrics (rank 0; other ranks the same values)."""
    ranks = runtime.discover_ranks()
    _setup_logging(ranks.rank)
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
    if ranks.rank == 0:
        # Both: checkpoint.dir may lie outside the run directory.
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt_root.mkdir(parents=True, exist_ok=True)
        (out_dir / "run_config.yaml").write_text(to_yaml(cfg))
        log.info("resolved config:\n%s", to_yaml(cfg))
        log.info("schedule: %s", resolved.model.schedule.describe())
        if resolved.pipeline_layout:
            log.info("pipeline layout: %s", resolved.pipeline_layout)

    resume_dir = ckpt.latest(ckpt_root) if cfg.checkpoint.auto_resume else None
    if resume_dir is not None:
        ckpt.check_resumable(resume_dir, dataclasses.asdict(cfg.parallel))
    chunks, tcfg = build_chunks(cfg, resolved.model, resolved.pipeline_layout, device)
    start_step, consumed = 0, 0
    if resume_dir is not None:
        state = ckpt.read_state(resume_dir)
        start_step, consumed = state.step, state.consumed_train_samples
    elif cfg.checkpoint.load_pretrained:
        ckpt.load_model_only(Path(cfg.checkpoint.load_pretrained), chunks)

    total = cfg.total_steps
    if start_step >= total:
        log.info("run already complete (%d/%d steps)", start_step, total)
        return {}
    # Wrap for the stage whose optimizer wrote the checkpoint (a stage-end checkpoint belongs to
    # the stage that just finished); the loop switches stages when the next step needs it.
    wrap_index = position(cfg, max(start_step - 1, 0)).index
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    expert_load = ExpertLoadTracker(chunks, resolved.model, finalize_model_grads)
    wrapped = wrap_stage(cfg, chunks, tcfg, cfg.recipe.stages[wrap_index], expert_load)
    if resume_dir is not None:
        # The checkpoint was saved by the stage it belongs to; load with that stage's optimizer.
        ckpt.load(resume_dir, [c.module for c in wrapped.ddp_chunks], wrapped.optimizer)
        log.info("resumed from %s (step %d, %d samples)", resume_dir, start_step, consumed)

    dp_rank = ps.get_data_parallel_rank()
    train_iter, valid_ds = _data(cfg, resolved, consumed, dp_rank)
    eod = None
    if cfg.data.pack_documents:
        from indexcache_train.data import load_tokenizer

        eod = load_tokenizer(cfg.data.tokenizer_path()).eod
    runner = StepRunner(
        resolved.model.schedule,
        cfg.model.seq_length,
        cfg.optim.micro_batch_size,
        device,
        cp_size=ps.get_context_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
        packed_eod=eod,
    )
    peak = cfg.logging.peak_tflops or (
        device_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    )
    meter = Throughput(ranks.world_size, peak)
    is_logging_rank = ranks.rank == 0
    logger = make_logger(
        cfg.logging.wandb_mode,
        cfg.logging.wandb_project,
        out_dir.name,
        dataclasses.asdict(cfg),
        str(out_dir),
        is_logging_rank,
    )
    stop = _Stop()
    stop.install()
    nonfinite = _NonFiniteGuard(cfg.optim.on_nonfinite, cfg.optim.max_consecutive_skips)
    metrics: dict[str, float] = {}
    steps_this_process = 0
    step = start_step
    if cfg.logging.eval_interval and start_step == 0:
        # Baseline before the first update (e.g. L_multi of the loaded indexers).
        first = position(cfg, 0)
        _record_eval(
            out_dir,
            0,
            first.stage.name,
            _evaluate(cfg, resolved, wrapped, runner, valid_ds, first, device, is_logging_rank),
            is_logging_rank,
        )
    while step < total:
        pos = position(cfg, step)
        if pos.index != wrap_index:
            wrapped = switch_stage(cfg, wrapped, tcfg, pos.stage, expert_load)
            wrap_index = pos.index
            log.info(
                "stage switch at step %d -> %s (trainable: %s, attention: %s)",
                step,
                pos.stage.name,
                pos.stage.trainable,
                pos.stage.attention,
            )
        metrics = _train_step(
            cfg, resolved, wrapped, runner, train_iter, pos, step, meter, device, nonfinite
        )
        metrics.update(expert_load.metrics(device))
        step += 1
        steps_this_process += 1
        consumed += cfg.optim.global_batch_size
        if is_logging_rank and (step % cfg.logging.log_interval == 0 or step == total):
            log.info(step_line(step, total, pos.stage.name, metrics, meter.eta_s(total - step)))
        if is_logging_rank:
            with open(
                out_dir / "metrics.jsonl", "a"
            ) as f:  # every step; golden curves and resume checks
                f.write(json.dumps({"step": step, "stage": pos.stage.name, **metrics}) + "\n")
        logger.log(metrics, step)
        if cfg.logging.eval_interval and step % cfg.logging.eval_interval == 0 and step < total:
            evaluated = _evaluate(
                cfg, resolved, wrapped, runner, valid_ds, pos, device, is_logging_rank
            )
            _record_eval(out_dir, step, pos.stage.name, evaluated, is_logging_rank)
            metrics.update(evaluated)
        reason = _save_reason(cfg, pos, step, total, stop, device, steps_this_process)
        if reason:
            state = ckpt.TrainerState(
                step, pos.index, consumed, reason, cfg.checkpoint.optimizer_format
            )
            d = ckpt.save(
                ckpt_root,
                [c.module for c in wrapped.ddp_chunks],
                wrapped.optimizer,
                state,
                _files(cfg, resolved),
            )
            stage_ends = {ckpt.step_dir(ckpt_root, s).name for s in _stage_end_steps(cfg)}
            ckpt.apply_retention(ckpt_root, cfg.checkpoint.keep_last, stage_ends)
            if is_logging_rank:
                log.info("saved %s (%s)", d, reason)
            if reason == "signal" or _exit_requested(cfg, steps_this_process):
                break
    if step == total:
        last = position(cfg, total - 1)
        evaluated = _evaluate(
            cfg, resolved, wrapped, runner, valid_ds, last, device, is_logging_rank
        )
        _record_eval(out_dir, step, last.stage.name, evaluated, is_logging_rank)
        metrics.update(evaluated)
        if is_logging_rank:
            log.info(
                "final eval | "
                + " | ".join(
                    f"{k} {v:.5g}" for k, v in sorted(metrics.items()) if k.startswith("eval/")
                )
            )
    logger.log(metrics, step)
    logger.finish()
    return metrics


def _stage_end_steps(cfg: TrainConfig) -> list[int]:
    out, s = [], 0
    for st in cfg.recipe.stages:
        s += st.steps
        out.append(s)
    return out


def _exit_requested(cfg: TrainConfig, steps_this_process: int) -> bool:
    n = cfg.checkpoint.exit_after_steps
    return bool(n) and steps_this_process >= n


def _save_reason(cfg, pos, step, total, stop: _Stop, device, steps_this_process) -> str | None:
    if stop.agreed(device):
        return "signal"
    if step == total:
        return "final"
    if pos.is_last_step_of_stage:
        return "stage_end"
    if _exit_requested(cfg, steps_this_process):
        return "exit_after_steps"
    if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
        return "interval"
    return None


def _train_step(
    cfg,
    resolved,
    wrapped: Wrapped,
    runner: StepRunner,
    train_iter: Iterator,
    pos,
    step,
    meter,
    device,
    guard: _NonFiniteGuard,
):
    stage = pos.stage
    lr = apply_lr(wrapped.optimizer, stage, pos.step_in_stage, cfg.optim.weight_decay)
    for c in wrapped.ddp_chunks:
        c.zero_grad_buffer()
    wrapped.optimizer.zero_grad()
    frozen = stage.trainable == "indexers"
    result = runner.run(
        wrapped.ddp_chunks,
        train_iter,
        resolved.num_microbatches,
        attention=stage.attention,
        distill=distill_settings(cfg),
        frozen_trunk=frozen,
        forward_only=False,
    )
    # Checked before the update: a NaN/inf step never reaches the weights (Megatron's bf16
    # optimizer has no loss scaler to catch it, and clipping passes a NaN norm through).
    reason = _nonfinite_reason(result, wrapped, frozen, device)
    if guard.check(reason, step + 1):
        ok, grad_norm = False, None
    else:
        ok, grad_norm, _ = wrapped.optimizer.step()
    tokens = cfg.optim.global_batch_size * cfg.model.seq_length
    flops = step_flops(
        resolved.model, cfg.model.seq_length, tokens, stage.attention, not frozen, cfg.distill.mode
    )
    per_full = multi_loss_by_full_layer(result.kl, resolved.model.schedule, distill_settings(cfg))
    metrics = {
        "loss/lm": result.lm_loss,
        # Averaged over Full layers only (a known upstream bug divides by all layers).
        "loss/indexer": sum(per_full.values()) / len(per_full) if per_full else float("nan"),
        "optim/lr": lr,
        "optim/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "optim/indexer_grad_norm": _group_grad_norm(wrapped.optimizer, "indexer"),
        "optim/update_ok": float(bool(ok)),
        "optim/skipped": float(reason is not None),
        "memory/gib": memory_gib(device),
        "flops/total": flops.total,
        **meter.tick(tokens, flops.total),
    }
    metrics.update({f"indexcache/l_multi/layer{k}": v for k, v in per_full.items()})
    metrics.update({f"indexcache/kl/{a}->{b}": v for (a, b), v in result.kl.items()})
    return metrics


class _NonFiniteGuard:
    """``optim.on_nonfinite``: stop at the first non-finite step, or skip up to N in a row."""

    def __init__(self, mode: str, max_consecutive: int) -> None:
        self.mode, self.max_consecutive = mode, max_consecutive
        self.consecutive = 0

    def check(self, reason: str | None, step: int) -> bool:
        """True: skip this step's update. Raises when the run must stop."""
        if reason is None:
            self.consecutive = 0
            return False
        self.consecutive += 1
        if self.mode == "stop":
            raise FloatingPointError(
                f"step {step}: {reason}; stopped before the update, so the weights and the last "
                "checkpoint are clean. Lower the learning rate or resume with "
                "optim.on_nonfinite=skip to drop such steps"
            )
        if self.consecutive > self.max_consecutive:
            raise FloatingPointError(
                f"step {step}: {reason}, the {self.consecutive}th non-finite step in a row "
                f"(optim.max_consecutive_skips={self.max_consecutive}); the run diverged, "
                "resume from an earlier checkpoint with a lower learning rate"
            )
        log.warning("step %d: %s; update skipped (optim.on_nonfinite=skip)", step, reason)
        return True


def _nonfinite_reason(result, wrapped: Wrapped, frozen: bool, device) -> str | None:
    """Why this step must not update (None: it may). The losses are already reduced over the
    world; the gradient flag is reduced here, so every rank takes the same decision."""
    if not frozen and not math.isfinite(result.lm_loss):
        return f"non-finite LM loss ({result.lm_loss})"
    bad_terms = sorted(pair for pair, v in result.kl.items() if not math.isfinite(v))
    if bad_terms:
        return f"non-finite distillation terms (Full layer -> served layer) {bad_terms}"
    flag = torch.zeros(1, device=device)
    for chunk in wrapped.ddp_chunks:
        for buf in [*chunk.buffers, *chunk.expert_parallel_buffers]:
            flag = torch.maximum(flag, (~torch.isfinite(buf.grad_data)).any().float())
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return "non-finite gradients" if float(flag) > 0 else None


def _group_grad_norm(optimizer, group: str) -> float:
    """Norm of a separately clipped parameter group (the indexers are clipped on their own, so
    the main ``grad_norm`` leaves them out; in the warm-up it is 0). A ``ChainedOptimizer``
    keeps the group norms itself (its sub-optimizers' stay empty); a lone optimizer in its own
    ``grad_norms_by_group``. Megatron computes them only when ``clip_grad > 0``: NaN otherwise."""
    own = getattr(optimizer, "grad_norms_by_group", None) or {}
    if own.get(group) is not None:
        return float(own[group])
    norms = [
        o.grad_norms_by_group.get(group)
        for o in getattr(optimizer, "chained_optimizers", [optimizer])
        if getattr(o, "grad_norms_by_group", None)
    ]
    norms = [float(n) for n in norms if n is not None]
    return math.sqrt(sum(n * n for n in norms)) if norms else float("nan")


def _evaluate(
    cfg, resolved, wrapped: Wrapped, runner: StepRunner, valid_ds, pos, device, is_logging_rank
) -> dict[str, float]:
    """Held-out LM loss, every served layer's KL term and every layer's top-k recall, with the
    current stage's attention (no graphs). The same first ``eval_iters`` validation batches
    every time, so evaluations compare across steps and runs."""
    if valid_ds is None:
        return {}
    from indexcache_train.data import build_dataloader

    loader = iter(
        build_dataloader(
            valid_ds,
            cfg.optim.micro_batch_size,
            0,
            data_parallel_rank=ps.get_data_parallel_rank(),
            data_parallel_size=resolved.data_parallel_size,
            num_workers=0,
        )
    )
    for c in wrapped.ddp_chunks:
        c.eval()
    # Measure the terms of *every* served layer (multi mode, no graph) whatever the run trains
    # with, so an own_layer run reports the same L_multi / Shared-layer KL as a multi run.
    measure = dataclasses.replace(distill_settings(cfg, training=False), mode="multi")
    lm, kl, recall, n = 0.0, {}, {}, 0
    with torch.no_grad():
        for _ in range(cfg.logging.eval_iters):
            r = runner.run(
                wrapped.ddp_chunks,
                loader,
                resolved.num_microbatches,
                attention=pos.stage.attention,
                distill=measure,
                frozen_trunk=False,
                forward_only=True,
                measure_recall=True,
            )
            lm += r.lm_loss
            n += 1
            for k, v in r.kl.items():
                kl[k] = kl.get(k, 0.0) + v / cfg.logging.eval_iters
            for k, v in r.recall.items():
                recall[k] = recall.get(k, 0.0) + v / cfg.logging.eval_iters
    for c in wrapped.ddp_chunks:
        c.train()
    return eval_metrics(lm / max(n, 1), kl, recall, resolved.model.schedule, distill_settings(cfg))


def _record_eval(
    out_dir: Path, step: int, stage: str, metrics: dict[str, float], is_logging_rank: bool
) -> None:
    """``eval.jsonl`` (one line per evaluation; ``metrics.jsonl`` keeps one line per step)."""
    if not is_logging_rank or not metrics:
        return
    with open(out_dir / "eval.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "stage": stage, **metrics}) + "\n")
    keys = ("eval/lm_loss", "eval/l_multi", "eval/shared_kl", "eval/shared_recall")
    log.info(
        f"eval @ step {step} | " + " | ".join(f"{k} {metrics[k]:.5g}" for k in keys if k in metrics)
    )
