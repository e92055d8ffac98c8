"""In-process Megatron setup for single-process tests (gloo, world size 1)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from indexcache_train import compat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process(seed: int = 0) -> None:
    """World size 1, TP=PP=EP=CP=1; idempotent across tests in one pytest process."""
    from megatron.core import parallel_state as ps

    compat.apply()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group(compat.distributed_backend(), rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
    compat.model_parallel_seed(seed)
    torch.manual_seed(seed)
