"""``run.dry_run=true``: compose, validate, build one pipeline stage on the meta device, report.

No GPU and no real process group: a fake process group of the configured world size lets
Megatron create its parallel groups in one process, and every parameter lives on the ``meta``
device, so even a 744B-parameter stage costs no memory. Prints parameters per stage and an
estimate of the static memory per rank (bf16 weights, fp32 grads, distributed Adam state).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from indexcache_train.config.schema import TrainConfig
from indexcache_train.config.validate import Resolved

log = logging.getLogger("indexcache_train")


def check_data_here(cfg: TrainConfig) -> None:
    """The data files, if this machine has them (a dry run often runs on a login node that
    does not mount the training data: then say so instead of failing).

    Raises:
        DataConfigError: Data files that exist but are damaged or too small.
    """
    from indexcache_train.data import DataNotFoundError, check_data_sources

    try:
        tokens = check_data_sources(cfg.data, cfg.model.seq_length)
    except DataNotFoundError as e:
        log.warning("dry run | data NOT checked on this machine: %s", e)
        return
    if cfg.data.kind != "mock":
        samples = cfg.total_steps * cfg.optim.global_batch_size
        epochs = samples * cfg.model.seq_length / max(tokens, 1)
        log.info("dry run | data OK | %d training tokens (%.2f epochs)", tokens, epochs)


def dry_run(cfg: TrainConfig, resolved: Resolved) -> dict[str, float]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from indexcache_train import compat
    from indexcache_train.training import runtime

    compat.apply()
    check_data_here(cfg)
    world = cfg.run.world_size or runtime.discover_ranks().world_size
    pp = cfg.parallel.pipeline_model_parallel_size

    def enter_stage(pp_rank: int) -> None:
        # Megatron's rank order is tp-cp-ep-dp-pp: the first global rank of stage k is k * world/pp.
        if dist.is_initialized():
            ps.destroy_model_parallel()
            dist.destroy_process_group()
        dist.init_process_group(
            "fake", store=FakeStore(), rank=pp_rank * (world // pp), world_size=world
        )
        runtime.init_model_parallel(cfg, create_gloo_groups=False)
        runtime.seed_everything(cfg.run.seed)

    from megatron.core import parallel_state as ps

    from indexcache_train.training.model_setup import build_chunks

    dp = resolved.data_parallel_size
    bytes_per_param = (
        (2 if cfg.optim.bf16 else 4) + 4 + 12 / dp
    )  # weights + fp32 grads + sharded Adam
    worst = 0.0
    for pp_rank in range(pp):
        enter_stage(pp_rank)
        with torch.device("meta"):
            chunks, _ = build_chunks(
                cfg, resolved.model, resolved.pipeline_layout, torch.device("meta")
            )
        n_params = sum(p.numel() for c in chunks for p in c.parameters())
        n_indexer = sum(
            p.numel() for c in chunks for n, p in c.named_parameters() if ".indexer." in n
        )
        gib = n_params * bytes_per_param / 2**30
        worst = max(worst, gib)
        layers = [layer.layer_number - 1 for c in chunks for layer in c.decoder.layers]
        mtp = sum(len(c.mtp.layers) for c in chunks if getattr(c, "mtp_process", False))
        log.info(
            "dry run | pp stage %d | layers %s%s | params/rank %.3fB (indexers %.2fM) | "
            "static memory/rank ~%.1f GiB",
            pp_rank,
            f"{layers[0]}..{layers[-1]}" if layers else "-",
            f" + {mtp} MTP" if mtp else "",
            n_params / 1e9,
            n_indexer / 1e6,
            gib,
        )
        del chunks
    log.info(
        "dry run OK | world %d (tp %d pp %d cp %d ep %d dp %d) | max static memory/rank ~%.1f GiB "
        "(bf16 weights, fp32 grads, Adam sharded over dp; activations not included) | schedule %s",
        world,
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_context_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
        dp,
        worst,
        resolved.model.schedule.describe(),
    )
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return {"dry_run/max_static_gib_per_rank": worst}
