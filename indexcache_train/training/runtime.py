"""Process setup: rank discovery (torchrun or plain Slurm), process groups, seeds, run directory."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from indexcache_train import compat
from indexcache_train.config.schema import TrainConfig


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "slurm" or "single"


def discover_ranks(env: dict[str, str] | None = None) -> Ranks:
    """torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` win; else Slurm's one-task-per-GPU
    ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; else a single process."""
    env = dict(os.environ) if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return Ranks(
            int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun"
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return Ranks(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            "slurm",
        )
    return Ranks(0, 1, 0, "single")


def run_id(env: dict[str, str] | None = None) -> str:
    """Stable across restarts of one run: ``INDEXCACHE_RUN_ID`` (our Slurm scripts set it to the
    first job of a ``--dependency=singleton`` chain), else the Slurm job id, else ``local``.
    Never the clock: every rank must derive the same directory independently."""
    env = dict(os.environ) if env is None else env
    for key in ("INDEXCACHE_RUN_ID", "SLURM_JOB_ID"):
        if env.get(key):
            return env[key]
    return "local"


def run_dir(cfg: TrainConfig, env: dict[str, str] | None = None) -> Path:
    return Path(cfg.run.root) / f"{cfg.run.name}-{run_id(env)}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(ranks: Ranks) -> torch.device:
    """Initialise torch.distributed (NCCL on GPUs, gloo on CPU) and pick this rank's device."""
    compat.apply()
    if compat.has_cuda():
        torch.cuda.set_device(ranks.local_rank)
        device = torch.device("cuda", ranks.local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if ranks.launcher == "single":
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        elif ranks.launcher == "slurm" and "MASTER_ADDR" not in os.environ:
            raise RuntimeError(
                "plain srun launch needs MASTER_ADDR and MASTER_PORT (scripts/slurm/train.sbatch "
                "exports them); or launch through torchrun"
            )
        dist.init_process_group(
            compat.distributed_backend(),
            rank=ranks.rank,
            world_size=ranks.world_size,
            device_id=device if device.type == "cuda" else None,
        )
    return device


def init_model_parallel(cfg: TrainConfig, *, create_gloo_groups: bool = True) -> None:
    from megatron.core import parallel_state as ps

    p = cfg.parallel
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        create_gloo_process_groups=create_gloo_groups,
    )


def shutdown() -> None:
    """Leave together and release the process groups after a successful run.

    A rank that exits while a peer still holds the group can abort in gloo's or NCCL's
    destructors and turn a finished run into a failed job; the barrier makes every rank leave
    after the last collective of every other rank."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return
    dist.barrier()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Same seed on every rank: Megatron's tracker derives the per-TP-rank streams from it."""
    compat.model_parallel_seed(seed)
