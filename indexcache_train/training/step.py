"""One training / evaluation step through Megatron's ``get_forward_backward_func``.

Each micro-batch gets its own :class:`DSAForwardState` (explicit, recompute-safe top-k state).
In a frozen-trunk stage (dense warm-up) the model runs under ``torch.no_grad`` — the trunk builds
no autograd graph — while the distillation terms enable grad locally and are attached to the
stage output, so Megatron's schedule backpropagates only into the Full-layer indexers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from indexcache_train.data.packing import from_eod
from indexcache_train.model.forward_state import DistillSettings, DSAForwardState
from indexcache_train.ops.masking import KeyRange
from indexcache_train.parallel.context_parallel import split_for_rank
from indexcache_train.schedule import IndexCacheSchedule


@dataclass
class StepResult:
    lm_loss: float
    kl: dict[tuple[int, int], float] = field(default_factory=dict)
    num_tokens: int = 0
    #: layer -> mean top-k recall over rows (only when the run measured it; evaluation).
    recall: dict[int, float] = field(default_factory=dict)


class StepRunner:
    """Builds per-micro-batch states, runs the pipeline schedule, gathers metrics."""

    def __init__(
        self,
        schedule: IndexCacheSchedule,
        seq_length: int,
        micro_batch_size: int,
        device: torch.device,
        *,
        cp_size: int = 1,
        cp_rank: int = 0,
        packed_eod: int | None = None,
    ) -> None:
        self.schedule = schedule
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.device = device
        self.cp_size, self.cp_rank = cp_size, cp_rank
        #: EOD token id when samples pack several documents (attention stays inside each).
        self.packed_eod = packed_eod
        self._states: list[DSAForwardState] = []
        self._pairs = [(g.source, m) for g in schedule.groups for m in g.members]

    # ------------------------------------------------------------------ Megatron callbacks
    def _forward_step(
        self,
        data_iterator: Iterator[dict],
        model,
        *,
        attention: str,
        distill: DistillSettings,
        frozen_trunk: bool,
        measure_recall: bool = False,
        eval_rows: int = 0,
    ):
        batch = next(data_iterator)
        tokens, labels, loss_mask, position_ids, key_range = self._local_batch(batch)
        state = DSAForwardState(
            self.schedule,
            position_ids,
            key_range=key_range,
            attention=attention,  # type: ignore[arg-type]
            distill=distill,
            measure_recall=measure_recall,
            eval_rows=eval_rows,
        )
        self._states.append(state)
        with torch.no_grad() if frozen_trunk else nullcontext():
            output = model(
                tokens, position_ids, None, labels=labels, loss_mask=loss_mask, dsa_state=state
            )
        return output, partial(self._loss, loss_mask)

    def _local_batch(self, batch: dict):
        """This rank's rows: packed-document layout, then the context-parallel zigzag split.

        Positions restart per document when samples are packed (``packed_eod``); the key range
        keeps every query inside its document and, under CP, gives each local row its global
        position in the stream (keys are gathered over the CP group inside attention).
        """
        dev = self.device
        tokens = batch["tokens"].to(dev, non_blocking=True)
        labels = batch["labels"].to(dev, non_blocking=True)
        loss_mask = batch["loss_mask"].to(dev, non_blocking=True).float()
        position_ids = batch["position_ids"].to(dev, non_blocking=True)
        B, S = tokens.shape
        key_start = None
        if self.packed_eod is not None:
            layout = from_eod(tokens, self.packed_eod)
            position_ids, key_start = layout.position_ids_BS, layout.key_start_BS
        if self.cp_size == 1:
            key_range = None if key_start is None else KeyRange.build(B, S, dev, None, key_start)
            return tokens, labels, loss_mask, position_ids, key_range
        split = lambda t: split_for_rank(t, self.cp_size, self.cp_rank)  # noqa: E731
        query_index = split(torch.arange(S, device=dev).expand(B, S))
        key_start = None if key_start is None else split(key_start)
        tokens, labels, loss_mask, position_ids = (
            split(t) for t in (tokens, labels, loss_mask, position_ids)
        )
        key_range = KeyRange.build(B, S // self.cp_size, dev, query_index, key_start)
        return tokens, labels, loss_mask, position_ids, key_range

    @staticmethod
    def _loss(loss_mask: torch.Tensor, output: torch.Tensor):
        # Megatron's per-token form (sum, tokens): gradients are divided by the global token
        # count in finalize_model_grads, the same for every TP/CP/DP layout and micro-batching.
        n = loss_mask.sum()
        total = (output.float() * loss_mask).sum()
        return total, n.to(torch.int), {"lm_loss": torch.stack([total.detach(), n.detach()])}

    # ------------------------------------------------------------------ public
    def run(
        self,
        chunks: list,
        data_iterator: Any,
        num_microbatches: int,
        *,
        attention: str,
        distill: DistillSettings,
        frozen_trunk: bool,
        forward_only: bool,
        measure_recall: bool = False,
        eval_rows: int = 0,
    ) -> StepResult:
        self._states.clear()
        forward_backward = get_forward_backward_func()
        step = partial(
            self._forward_step,
            attention=attention,
            distill=distill,
            frozen_trunk=frozen_trunk,
            measure_recall=measure_recall,
            eval_rows=eval_rows,
        )
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
        layers = sorted({m for g in self.schedule.groups for m in g.members})
        recall = torch.zeros(len(layers), 2, dtype=torch.float64, device=self.device)
        for st in self._states:
            for pair, value in st.kl_terms.items():
                kl[index[pair], 0] += float(value)
                kl[index[pair], 1] += 1
            for layer, hits_and_rows in st.recall.items():
                recall[layers.index(layer)] += hits_and_rows.to(recall)
        self._states.clear()
        if dist.is_initialized():
            dist.all_reduce(lm)
            dist.all_reduce(kl)
            dist.all_reduce(recall)
        # Only the last pipeline stage (and every DP/TP copy of it) holds LM losses; dividing the
        # reduced sum by the reduced token count gives the global token mean.
        lm_loss = float(lm[0] / lm[1]) if lm[1] > 0 else float("nan")
        kl_mean = {p: float(kl[i, 0] / kl[i, 1]) for p, i in index.items() if kl[i, 1] > 0}
        # Rows are summed over micro-batches and ranks before dividing (a row-weighted mean).
        recall_mean = {
            m: float(recall[i, 0] / recall[i, 1]) for i, m in enumerate(layers) if recall[i, 1] > 0
        }
        return StepResult(lm_loss, kl_mean, int(lm[1]), recall_mean)


def multi_loss_by_full_layer(
    kl: dict[tuple[int, int], float], schedule: IndexCacheSchedule, distill: DistillSettings
) -> dict[int, float]:
    """L_multi per Full layer: sum_j w_j KL(p^(l+j) || q^(l)) (means over rows)."""
    out: dict[int, float] = {}
    for g in schedule.groups:
        terms = [(j, kl[(g.source, m)]) for j, m in enumerate(g.members) if (g.source, m) in kl]
        if terms:
            out[g.source] = sum(distill.weight(j, g.size) * v for j, v in terms)
    return out


def eval_metrics(
    lm_loss: float,
    kl: dict[tuple[int, int], float],
    recall: dict[int, float],
    schedule: IndexCacheSchedule,
    distill: DistillSettings,
) -> dict[str, float]:
    """Held-out metrics from measured terms (evaluation measures every served layer's term, so
    an ``own_layer`` or ``none`` run is scored on the same L_multi as a ``multi`` run).

    * ``eval/indexer_loss``: the run's own objective (``distill``'s mode and weights), averaged
      over Full layers; ``eval/l_multi``: the multi-layer loss with ``distill``'s weights
      (uniform unless ``distill.weights``), whatever the run's mode; ``eval/l_multi/layer<l>``.
    * ``eval/shared_kl``: mean KL of the Shared layers' terms; ``eval/kl/<full>-><served>``.
    * ``eval/recall/layer<i>``: top-k recall of each layer (a Shared layer: of the reused
      indices) against its own attention; ``eval/shared_recall`` / ``eval/full_recall``: means.
    """
    out = {"eval/lm_loss": lm_loss}
    own = multi_loss_by_full_layer(kl, schedule, distill)
    multi = multi_loss_by_full_layer(kl, schedule, replace(distill, mode="multi"))
    if own:
        out["eval/indexer_loss"] = sum(own.values()) / len(own)
    if multi:
        out["eval/l_multi"] = sum(multi.values()) / len(multi)
        out.update({f"eval/l_multi/layer{k}": v for k, v in multi.items()})
    shared = [v for (a, b), v in kl.items() if a != b]
    if shared:
        out["eval/shared_kl"] = sum(shared) / len(shared)
    out.update({f"eval/kl/{a}->{b}": v for (a, b), v in sorted(kl.items())})
    out.update({f"eval/recall/layer{i}": v for i, v in sorted(recall.items())})
    for name, want_full in (("eval/full_recall", True), ("eval/shared_recall", False)):
        values = [v for i, v in recall.items() if schedule.is_full(i) == want_full]
        if values:
            out[name] = sum(values) / len(values)
    return out
