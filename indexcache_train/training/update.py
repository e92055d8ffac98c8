"""One training update: lr, forward/backward, the non-finite guard, optimizer step, metrics."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from indexcache_train.config.schema import TrainConfig
from indexcache_train.config.validate import Resolved
from indexcache_train.model.forward_state import take_state_peak_bytes
from indexcache_train.training.flops import step_flops
from indexcache_train.training.lr import apply_lr
from indexcache_train.training.model_setup import Wrapped
from indexcache_train.training.nonfinite import BufferSnapshot, NonFiniteGuard, nonfinite_reason
from indexcache_train.training.observability import Throughput, memory_gib
from indexcache_train.training.stages import StagePosition, distill_settings
from indexcache_train.training.step import StepRunner, multi_loss_by_full_layer


def train_step(
    cfg: TrainConfig,
    resolved: Resolved,
    wrapped: Wrapped,
    runner: StepRunner,
    train_iter: Iterator,
    pos: StagePosition,
    step: int,
    meter: Throughput,
    device: torch.device,
    guard: NonFiniteGuard,
) -> dict[str, float]:
    """Run the 0-based global ``step``; returns its metrics (identical on every rank).

    Raises:
        FloatingPointError: The non-finite guard stops the run (before any update).
    """
    stage = pos.stage
    lr = apply_lr(wrapped.optimizer, stage, pos.step_in_stage, cfg.optim.weight_decay)
    for c in wrapped.ddp_chunks:
        c.zero_grad_buffer()
    wrapped.optimizer.zero_grad()
    frozen = stage.trainable == "indexers"
    buffers = BufferSnapshot([c.module for c in wrapped.ddp_chunks])
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
    reason = nonfinite_reason(result, wrapped.ddp_chunks, frozen_trunk=frozen, device=device)
    if guard.check(reason, step + 1):
        buffers.restore()  # finalize_model_grads already moved the routers' expert bias
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
        # Peak bytes the IndexCache forward state held this step (per rank; see forward_state).
        "memory/dsa_state_peak_gib": take_state_peak_bytes() / 2**30,
        "flops/total": flops.total,
        **meter.tick(tokens, flops.total),
    }
    metrics.update({f"indexcache/l_multi/layer{k}": v for k, v in per_full.items()})
    metrics.update({f"indexcache/kl/{a}->{b}": v for (a, b), v in result.kl.items()})
    return metrics


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
