"""Per-stage learning rate: linear warm-up then cosine decay to ``min_lr`` within each stage."""

from __future__ import annotations

import math

from indexcache_train.config.schema import StageSection


def stage_lr(stage: StageSection, step_in_stage: int) -> float:
    if stage.warmup_steps and step_in_stage < stage.warmup_steps:
        return stage.lr * (step_in_stage + 1) / stage.warmup_steps
    decay = max(stage.steps - stage.warmup_steps, 1)
    progress = min(max(step_in_stage - stage.warmup_steps, 0) / decay, 1.0)
    return stage.min_lr + 0.5 * (stage.lr - stage.min_lr) * (1 + math.cos(math.pi * progress))


def apply_lr(optimizer, stage: StageSection, step_in_stage: int, weight_decay: float) -> float:
    """Set lr / weight decay on every param group; returns the stage's (trunk) lr.

    A group with its own peak (``max_lr``, e.g. the indexers' ``indexer_lr``) follows the same
    warm-up/cosine shape scaled to that peak; ``wd_mult`` (0 for norms and biases) as in
    Megatron's ``OptimizerParamScheduler``.
    """
    lr = stage_lr(stage, step_in_stage)
    for group in optimizer.param_groups:
        peak = group.get("max_lr")
        scale = peak / stage.lr if peak is not None and stage.lr > 0 else 1.0
        group["lr"] = lr * scale * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)
    return lr
