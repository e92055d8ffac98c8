"""Held-out evaluation: LM loss, every served layer's KL term and every layer's top-k recall."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from megatron.core import parallel_state as ps

from indexcache_train.config.schema import TrainConfig
from indexcache_train.config.validate import Resolved
from indexcache_train.training.model_setup import Wrapped
from indexcache_train.training.stages import StagePosition, distill_settings
from indexcache_train.training.step import StepRunner, eval_metrics

#: The headline of an evaluation, in the log line.
HEADLINE = ("eval/lm_loss", "eval/l_multi", "eval/shared_kl", "eval/shared_recall")


def evaluate(
    cfg: TrainConfig,
    resolved: Resolved,
    wrapped: Wrapped,
    runner: StepRunner,
    valid_ds: Any,
    pos: StagePosition,
) -> dict[str, float]:
    """Evaluate with the current stage's attention (no graphs); ``{}`` without validation data.

    The same first ``logging.eval_iters`` validation batches every time, so evaluations compare
    across steps and runs.
    """
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
                eval_rows=cfg.logging.eval_rows,
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


def eval_line(step: int, metrics: dict[str, float]) -> str:
    """``eval @ step N | eval/lm_loss ... |``: the headline metrics of one evaluation."""
    shown = " | ".join(f"{k} {metrics[k]:.5g}" for k in HEADLINE if k in metrics)
    return f"eval @ step {step} | {shown}"
