"""Process groups, the parallel layout and one pipeline stage of the model, for ``import`` / ``verify``.

The tools never compute with the model: they build a stage, fill its parameters and save (or
load) it. So every tensor stays in host memory and the process group is always gloo, which needs
no GPU per rank: a 64-rank CPU import on an 8-GPU node works the same as on a laptop.

Layout rule (Megatron-Core 0.19.2 ``initialize_model_parallel``): ``world = TP x PP x DP``, and
the expert grid ``ETP x EP x expert-DP x PP`` must tile the same world. The import picks expert
tensor parallelism itself (the checkpoint does not depend on it): ``ETP = TP / EP`` when EP
divides TP, else 1, so EP is carved out of ``TP x DP`` ("MoE parallel folding") and no two ranks
of a stage hold the same piece of an expert. ``--tp 8 --ep 8`` needs 8 ranks, ``--tp 2`` 2 (experts
split in two like the rest), ``--tp 2 --ep 8`` 32: ``PP x lcm(TP, EP)``.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from checkpoint_tools.errors import ParallelLayoutError
from indexcache_train import compat
from indexcache_train.model.config import ModelConfig

if TYPE_CHECKING:
    from indexcache_train.model.gpt import IndexCacheGPTModel


@dataclass(frozen=True)
class ParallelLayout:
    """The TP / PP / EP / expert-TP layout a Megatron stage is built at."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1

    @classmethod
    def for_import(cls, tp: int = 1, pp: int = 1, ep: int = 1) -> ParallelLayout:
        """The layout ``import`` builds at: expert TP = TP / EP where EP divides TP, else 1."""
        return cls(tp, pp, ep, tp // ep if ep > 0 and tp % ep == 0 else 1)

    def describe(self) -> str:
        return f"TP={self.tp} PP={self.pp} EP={self.ep} ETP={self.etp}"

    def min_world_size(self) -> int:
        """The smallest world this layout fits: PP x lcm(TP, EP x ETP)."""
        return self.pp * math.lcm(self.tp, self.ep * self.etp)

    def check(self, world_size: int, cfg: ModelConfig) -> None:
        """Raise :class:`ParallelLayoutError` unless ``world_size`` ranks can build ``cfg`` so."""
        sizes = {"--tp": self.tp, "--pp": self.pp, "--ep": self.ep, "etp": self.etp}
        bad = [f"{k}={v}" for k, v in sizes.items() if v < 1]
        if bad:
            raise ParallelLayoutError(f"parallel sizes must be >= 1 ({', '.join(bad)})")
        need = self.min_world_size()
        if world_size % (self.tp * self.pp) or (world_size // self.pp) % (self.ep * self.etp):
            raise ParallelLayoutError(
                f"world size {world_size} does not fit {self.describe()}: it must be a multiple of "
                f"TP x PP = {self.tp * self.pp} and EP must divide TP x DP",
                fix=f"launch `torchrun --nproc-per-node {need} -m checkpoint_tools import ...` "
                f"(PP x lcm(TP, EP) = {need} ranks) or change --tp/--pp/--ep",
            )
        divisible = {
            "num_attention_heads": (cfg.num_attention_heads, self.tp),
            "vocab_size": (cfg.vocab_size, self.tp),
            "n_routed_experts": (cfg.n_routed_experts, self.ep),
        }
        for key, (value, by) in divisible.items():
            if value % by:
                raise ParallelLayoutError(
                    f"{key}={value} is not divisible by {by} ({self.describe()})",
                    fix="choose sizes that divide the model's dimensions",
                )


def hide_gpus() -> None:
    """Run on the CPU even on a GPU node (call first thing in a verb's ``main``).

    The tools never compute on a GPU, and without CUDA every rank takes the code path the CPU
    tests cover (``compat``'s CPU fixes, gloo, all tensors in host memory). Effective only
    before CUDA is initialised, which nothing before the verb's ``main`` does.
    """
    if not torch.cuda.is_initialized():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def launch_world_size() -> int:
    """World size of this launch (torchrun's ``WORLD_SIZE``; 1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_parallel(layout: ParallelLayout, seed: int = 0) -> None:
    """Process group (gloo) and Megatron's parallel state for ``layout``; idempotent."""
    compat.apply()
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        if "RANK" in os.environ:  # torchrun: env:// rendezvous
            dist.init_process_group("gloo")
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ["MASTER_PORT"] = str(_free_port())
            dist.init_process_group("gloo", rank=0, world_size=1)
    if ps.model_parallel_is_initialized():
        have = ParallelLayout(
            ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_expert_model_parallel_world_size(),
            ps.get_expert_tensor_parallel_world_size(),
        )
        if have != layout:
            raise ParallelLayoutError(
                f"this process is already set up for {have.describe()}, not {layout.describe()}",
                fix="run the tool in a fresh process",
            )
    else:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.etp,
        )
    compat.model_parallel_seed(seed)


def build_stage(
    cfg: ModelConfig,
    layout: ParallelLayout,
    dtype: torch.dtype,
    pipeline_layout: str | None = None,
    kernel_backend: str = "auto",
) -> IndexCacheGPTModel:
    """This rank's pipeline stage, uninitialised (parameters are filled or loaded next)."""
    from megatron.core import parallel_state as ps

    from indexcache_train.model.factory import ParallelSettings, build_model, transformer_config

    settings = ParallelSettings(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        # Megatron requires SP for MoE with TP; nothing runs forward during a conversion.
        sequence_parallel=layout.tp > 1,
        pipeline_model_parallel_layout=pipeline_layout,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,
        # Random init of a 700B model costs hours and is overwritten anyway.
        perform_initialization=False,
        moe_token_dispatcher_type="allgather",
    )
    tcfg = transformer_config(cfg, settings)
    tcfg.expert_tensor_parallel_size = layout.etp  # ParallelSettings has no ETP knob
    pp_rank = ps.get_pipeline_model_parallel_rank()
    return build_model(
        cfg,
        tcfg,
        pre_process=pp_rank == 0,
        post_process=pp_rank == layout.pp - 1,
        pp_rank=pp_rank,
        kernel_backend=kernel_backend,
    )


def rank_coordinates() -> dict[str, int]:
    """This rank's position in every parallel group (for reports)."""
    from megatron.core import parallel_state as ps

    return {
        "rank": dist.get_rank(),
        "tp": ps.get_tensor_model_parallel_rank(),
        "pp": ps.get_pipeline_model_parallel_rank(),
        "ep": ps.get_expert_model_parallel_rank(),
    }


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``VmHWM``; current RSS where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.Process().memory_info().rss)


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
