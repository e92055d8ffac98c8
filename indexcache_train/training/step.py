"""One training / evaluation step through Megatron's ``get_forward_backward_func``.

Each micro-batch gets its own :class:`DSAForwardState` (explicit, recompute-safe top-k state).
In a frozen-trunk stage (dense warm-up) the model runs under ``torch.no_grad`` — the trunk builds
no autograd graph — while the distillation terms enable grad locally and are attached to the
stage output, so Megatron's schedule backpropagates only into the Full-layer indexers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from indexcache_train.model.forward_state import DistillSettings, DSAForwardState
from indexcache_train.schedule import IndexCacheSchedule


@dataclass
class StepResult:
    lm_loss: float
    kl: dict[tuple[int, int], float] = field(default_factory=dict)
    num_tokens: int = 0


class StepRunner:
    """Builds per-micro-batch states, runs the pipeline schedule, gathers metrics."""

    def __init__(self, schedule: IndexCacheSchedule, seq_length: int, micro_batch_size: int,
                 device: torch.device) -> None:
        self.schedule = schedule
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.device = device
        self._states: list[DSAForwardState] = []
        self._pairs = [(g.source, m) for g in schedule.groups for m in g.members]

    # ------------------------------------------------------------------ Megatron callbacks
    def _forward_step(self, data_iterator: Iterator[dict], model, *, attention: str,
                      distill: DistillSettings, frozen_trunk: bool):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        loss_mask = batch["loss_mask"].to(self.device, non_blocking=True).float()
        position_ids = batch["position_ids"].to(self.device, non_blocking=True)
        state = DSAForwardState(self.schedule, position_ids, attention=attention, distill=distill)  # type: ignore[arg-type]
        self._states.append(state)
        with torch.no_grad() if frozen_trunk else nullcontext():
            output = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask, dsa_state=state)
        return output, partial(self._loss, loss_mask)

    @staticmethod
    def _loss(loss_mask: torch.Tensor, output: torch.Tensor):
        n = loss_mask.sum().clamp_min(1.0)
        loss = (output.float() * loss_mask).sum() / n
        return loss, {"lm_loss": torch.stack([loss.detach() * n, n.detach()])}

    # ------------------------------------------------------------------ public
    def run(self, chunks: list, data_iterator: Any, num_microbatches: int, *, attention: str,
            distill: DistillSettings, frozen_trunk: bool, forward_only: bool) -> StepResult:
        self._states.clear()
        forward_backward = get_forward_backward_func()
        step = partial(self._forward_step, attention=attention, distill=distill, frozen_trunk=frozen_trunk)
        out = forward_backward(
            forward_step_func=step,
            data_iterator=data_iterator if len(chunks) == 1 else [data_iterator] * len(chunks),
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=num_microbatches,
            seq_length=self.seq_length,
            micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
        )
        return self._reduce(out)

    def _reduce(self, losses: list[dict]) -> StepResult:
        """Average over micro-batches and the whole world (metrics are tiny; one all-reduce)."""
        lm = torch.zeros(2, dtype=torch.float64, device=self.device)
        for d in losses or []:
            lm += d["lm_loss"].double().to(self.device)
        kl = torch.zeros(len(self._pairs), 2, dtype=torch.float64, device=self.device)
        index = {p: i for i, p in enumerate(self._pairs)}
        for st in self._states:
            for pair, value in st.kl_terms.items():
                kl[index[pair], 0] += float(value)
                kl[index[pair], 1] += 1
        self._states.clear()
        if dist.is_initialized():
            dist.all_reduce(lm)
            dist.all_reduce(kl)
        # Only the last pipeline stage (and every DP/TP copy of it) holds LM losses; dividing the
        # reduced sum by the reduced token count gives the global token mean.
        lm_loss = float(lm[0] / lm[1]) if lm[1] > 0 else float("nan")
        kl_mean = {p: float(kl[i, 0] / kl[i, 1]) for p, i in index.items() if kl[i, 1] > 0}
        return StepResult(lm_loss, kl_mean, int(lm[1]))


def multi_loss_by_full_layer(kl: dict[tuple[int, int], float], schedule: IndexCacheSchedule,
                             distill: DistillSettings) -> dict[int, float]:
    """L_multi per Full layer: sum_j w_j KL(p^(l+j) || q^(l)) (means over rows)."""
    out: dict[int, float] = {}
    for g in schedule.groups:
        terms = [(j, kl[(g.source, m)]) for j, m in enumerate(g.members) if (g.source, m) in kl]
        if terms:
            out[g.source] = sum(distill.weight(j, g.size) * v for j, v in terms)
    return out
