"""MoE load-balance metrics from the routers' own token counts (aux-loss-free balancing).

GLM-5 / DeepSeek-V3.2 routers balance by an expert bias that Megatron-Core updates from each
router's ``local_tokens_per_expert`` inside ``finalize_model_grads`` and then zeroes. This wraps
that function: it snapshots the counts just before Megatron consumes them, so the metrics see
exactly the loads the bias update saw, with no extra forward work. One all-reduce per step of a
``[layers + MTP layers, experts]`` tensor over the whole world: every rank holds the same shape
(rows of layers on other pipeline stages stay zero), so no rank can skip the collective.

Counts include every token a router saw under autograd in the step (all micro-batches; a
recomputed forward counts twice, uniformly, which leaves the ratios below unchanged). A frozen
trunk (dense warm-up) routes under ``no_grad`` and counts nothing: no metrics then.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from indexcache_train.model.config import ModelConfig

_MTP = re.compile(r"(?:^|\.)mtp\.layers\.(\d+)\.")


class ExpertLoadTracker:
    """``finalize_model_grads`` wrapper that keeps the step's per-expert token counts."""

    def __init__(
        self, chunks: list[torch.nn.Module], cfg: ModelConfig, finalize: Callable[..., Any]
    ) -> None:
        self.finalize = finalize
        self.num_slots = cfg.num_hidden_layers + cfg.num_mtp_layers
        self.num_experts = cfg.n_routed_experts
        self.num_layers = cfg.num_hidden_layers
        #: Whether any layer of the model (on any rank) routes: decided from the config, so every
        #: rank agrees on calling the all-reduce.
        self.enabled = any(cfg.is_moe_layer(i) for i in range(self.num_slots))
        self._routers: list[tuple[int, torch.nn.Module]] = []
        for chunk in chunks:
            for name, module in chunk.named_modules():
                if getattr(module, "local_tokens_per_expert", None) is None:
                    continue
                self._routers.append((self._slot(chunk, name), module))
        self._counts: torch.Tensor | None = None

    def _slot(self, chunk: torch.nn.Module, router_name: str) -> int:
        mtp = _MTP.search(router_name)
        if mtp:  # MTP layer k is global layer N + k (the IndexCache schedule's numbering)
            return self.num_layers + int(mtp.group(1))
        layer = chunk.get_submodule(router_name.rsplit(".mlp", 1)[0])
        return int(layer.layer_number) - 1  # Megatron's layer_number: global, 1-based

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.enabled and self._routers:
            # Summed where the counts live (one host copy per step, in metrics(), not one sync
            # per router: GLM-5 has ~75 routed layers).
            device = self._routers[0][1].local_tokens_per_expert.device
            counts = torch.zeros(
                self.num_slots, self.num_experts, dtype=torch.float64, device=device
            )
            for slot, router in self._routers:
                counts[slot] += router.local_tokens_per_expert.detach().double()
            self._counts = counts
        return self.finalize(*args, **kwargs)

    def metrics(self, device: torch.device) -> dict[str, float]:
        """Collective over the world when the model has MoE layers; call on every rank."""
        if not self.enabled:
            return {}
        counts = (
            self._counts
            if self._counts is not None
            else torch.zeros(self.num_slots, self.num_experts, dtype=torch.float64)
        ).to(device)
        self._counts = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        return load_balance_metrics(counts.cpu(), self.num_layers)


def load_balance_metrics(counts_LE: torch.Tensor, num_layers: int) -> dict[str, float]:
    """Per routed layer: max expert load / mean load (1 = perfect balance) and the coefficient
    of variation; overall: the worst layer's max/mean and the mean CV. Layers with no counted
    tokens are left out."""
    out: dict[str, float] = {}
    ratios, cvs = [], []
    for slot in range(counts_LE.shape[0]):
        row = counts_LE[slot]
        mean = float(row.mean())
        if mean <= 0:
            continue
        name = f"layer{slot}" if slot < num_layers else f"mtp{slot - num_layers}"
        ratio = float(row.max()) / mean
        cv = float(row.std(unbiased=False)) / mean
        out[f"moe/load_max_over_mean/{name}"] = ratio
        out[f"moe/load_cv/{name}"] = cv
        ratios.append(ratio)
        cvs.append(cv)
    if ratios:
        out["moe/load_max_over_mean"] = max(ratios)
        out["moe/load_cv"] = sum(cvs) / len(cvs)
    return out
