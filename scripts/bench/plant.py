"""Run ``train.py`` with one planted bug: ``plant.py NAME [train.py overrides...]``.

The multi-GPU equivalence harness (``parallel_losses.py``) must *fail* on real parallelism bugs,
so it launches some jobs through this wrapper: it replaces one public function with a broken
version, then runs the trainer exactly as ``train.py`` would (same argv, same Hydra config).
Product code has no hooks for this. Every planted bug is in :data:`PLANTS`, the one place to
re-point when a seam moves; a seam that no longer exists fails loudly here, and a seam that
exists but is no longer called makes the harness's planted run *pass*, which its test reports
as a failure.

A plant replaces the function in its defining module and in every module that already holds it
under another name (``from X import f``), before the trainer's modules are imported; a method
(``attr`` ``Class.method``) is replaced on its class, which every instance reads it from.
"""

from __future__ import annotations

import importlib
import runpy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Plant:
    """One planted bug: which function it breaks, how, and which layouts must catch it."""

    module: str
    #: A module-level function, or ``Class.method``.
    attr: str
    why: str
    #: Layouts (``parallel_losses.LAYOUTS`` names) whose comparison must fail with this bug.
    layout: str
    broken: Callable[[Callable[..., Any]], Callable[..., Any]]


def _no_target_reduce(original: Callable[..., Any]) -> Callable[..., Any]:
    def reduce(self, parts):
        # This rank's partial head sums, never summed over TP: each rank distils only its own
        # heads' attention (under SP, for its own rows).
        return parts[self.rank]

    return reduce


def _cp_keys_in_rank_order(original: Callable[..., Any]) -> Callable[..., Any]:
    import torch

    def gathered_to_natural(local_len: int, cp: int, device="cpu"):
        # As if every CP rank held one contiguous block: the zigzag second chunk's keys get the
        # wrong global positions.
        return torch.arange(local_len * cp, device=device)

    return gathered_to_natural


def _local_token_count(original: Callable[..., Any]) -> Callable[..., Any]:
    def finalize_model_grads(model, num_tokens=None, *args, **kwargs):
        if num_tokens is not None:
            from megatron.core import parallel_state as ps

            # Per-token gradients divided by this rank's token count, not the global one (as if
            # the DP x CP all-reduce of the count were dropped): gradients x dp*cp.
            num_tokens = num_tokens / ps.get_data_parallel_world_size(with_context_parallel=True)
        return original(model, num_tokens, *args, **kwargs)

    return finalize_model_grads


def _no_sp_grad_sum(original: Callable[..., Any]) -> Callable[..., Any]:
    def allreduce_non_tensor_model_parallel_grads(*args, **kwargs):
        return None  # norms, routers, down projections keep their partial (own-rows) gradients

    return allreduce_non_tensor_model_parallel_grads


#: The planted bugs. ``layout`` is where the harness plants it (a layout that exercises it).
PLANTS: dict[str, Plant] = {
    "tp_target": Plant(
        "indexcache_train.ops.row_split",
        "RowSplit.reduce",
        "distillation target not summed over TP (the reduce-scatter, or all-reduce without SP, "
        "dropped: each rank's p covers its own heads only)",
        "tp2sp",
        _no_target_reduce,
    ),
    "sp_grads": Plant(
        "megatron.core.distributed.finalize_model_grads",
        "_allreduce_non_tensor_model_parallel_grads",
        "sequence-parallel partial gradients (norms, routers, MLA down projections) not summed "
        "over TP",
        "tp2sp",
        _no_sp_grad_sum,
    ),
    "cp_offset": Plant(
        "indexcache_train.parallel.context_parallel",
        "gathered_to_natural",
        "CP key all-gather left in rank order (zigzag second chunk at the wrong positions)",
        "cp2",
        _cp_keys_in_rank_order,
    ),
    "grad_scale": Plant(
        "megatron.core.distributed.finalize_model_grads",
        "finalize_model_grads",
        "per-token grads divided by the rank-local token count (DP all-reduce of it dropped)",
        "ep2",  # its dense parameters are data-parallel (DP=2), its experts expert-parallel
        _local_token_count,
    ),
}


def seam(plant: Plant) -> tuple[Any, Callable[..., Any] | None]:
    """The object holding the planted function (its module or class) and the function (None:
    it no longer exists)."""
    owner: Any = importlib.import_module(plant.module)
    *path, last = plant.attr.split(".")
    for part in path:
        owner = getattr(owner, part, None)
    original = getattr(owner, last, None)
    return owner, original if callable(original) else None


def install(name: str) -> int:
    """Plant ``name``; returns how many attributes now point at the broken function."""
    plant = PLANTS[name]
    owner, original = seam(plant)
    if original is None:
        raise SystemExit(
            f"plant {name}: {plant.module}.{plant.attr} no longer exists; re-point PLANTS in "
            f"{Path(__file__).relative_to(REPO)}"
        )
    broken = plant.broken(original)
    replaced = 0
    if isinstance(owner, type):  # a method: instances look it up on the class
        setattr(owner, plant.attr.rsplit(".", 1)[1], broken)
        replaced += 1
    for mod in list(sys.modules.values()):
        for key, value in list(getattr(mod, "__dict__", {}).items()):
            if value is original:
                setattr(mod, key, broken)
                replaced += 1
    return replaced


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in PLANTS:
        raise SystemExit(f"usage: plant.py NAME [train.py overrides]; NAME one of {sorted(PLANTS)}")
    sys.path.insert(0, str(REPO))
    install(argv[0])
    sys.argv = [str(REPO / "train.py"), *argv[1:]]
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
