"""Model chunks, per-stage trainability, DDP and the Megatron optimizer.

Megatron's DDP decides at wrap time which parameters it reduces (frozen ones are skipped), so a
recipe stage switch (warm-up: only Full-layer indexers; sparse: everything) unwraps, re-freezes,
re-wraps and rebuilds the optimizer. The Adam state of parameters trained in both stages is
carried over (gathered over the data-parallel group, then re-sliced for the new shard layout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import (
    OptimizerConfig,
    ParamKey,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from indexcache_train.compat import INDEXER_GRAD_NORM_GROUP
from indexcache_train.config.schema import StageSection, TrainConfig
from indexcache_train.model.config import ModelConfig
from indexcache_train.model.factory import ParallelSettings, build_model, transformer_config
from indexcache_train.model.gpt import IndexCacheGPTModel
from indexcache_train.model.grouped_experts import use_grouped_experts
from indexcache_train.model.specs import LOCAL, LOCAL_GROUPED


def is_indexer_param(name: str) -> bool:
    return ".core_attention.indexer." in name


def parallel_settings(
    cfg: TrainConfig, layout: str | None, device: torch.device
) -> ParallelSettings:
    p, o = cfg.parallel, cfg.optim
    return ParallelSettings(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        pipeline_model_parallel_layout=layout,
        params_dtype=torch.bfloat16 if o.bf16 else torch.float32,
        bf16=o.bf16,
        use_cpu_initialization=device.type in ("cpu", "meta"),
        # The dry run builds on the meta device: there is nothing to initialise.
        perform_initialization=device.type != "meta",
        recompute_granularity=p.recompute_granularity,
        recompute_method=p.recompute_method,
        recompute_num_layers=p.recompute_num_layers,
        moe_token_dispatcher_type=p.moe_token_dispatcher_type,
        moe_router_bias_update_rate=o.moe_router_bias_update_rate,
        moe_aux_loss_coeff=o.moe_aux_loss_coeff,
        mtp_loss_scaling_factor=o.mtp_loss_scaling_factor,
        # Per-token loss: exact global token mean for every layout (see training.step).
        calculate_per_token_loss=True,
    )


def build_chunks(
    cfg: TrainConfig, model_cfg: ModelConfig, layout: str | None, device: torch.device
) -> tuple[list[IndexCacheGPTModel], TransformerConfig]:
    """This rank's model chunks (one per virtual pipeline stage) on ``device``."""
    tcfg = transformer_config(model_cfg, parallel_settings(cfg, layout, device))
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size or 1
    pp_rank, pp_size = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_pipeline_model_parallel_world_size(),
    )
    grouped = use_grouped_experts(cfg.model.moe_grouped_gemm, device, tcfg.params_dtype)
    chunks = []
    for vp in range(vpp):
        vp_stage = vp if vpp > 1 else None
        first = pp_rank == 0 and vp == 0
        last = pp_rank == pp_size - 1 and vp == vpp - 1
        model = build_model(
            model_cfg,
            tcfg,
            pre_process=first,
            post_process=last,
            pp_rank=pp_rank,
            vp_stage=vp_stage,
            backend=LOCAL_GROUPED if grouped else LOCAL,
            kernel_backend=cfg.model.kernel_backend,
            max_sequence_length=cfg.model.seq_length,
            lm_loss_chunk=cfg.model.lm_loss_chunk,
        )
        chunks.append(model.to(device))
    for model in chunks:
        for name, p in model.named_parameters():
            if is_indexer_param(name):
                # Indexers learn only from the distillation loss; clip them on their own so
                # their gradients never rescale the trunk's (and vice versa).
                p.grad_norm_group = INDEXER_GRAD_NORM_GROUP
    return chunks, tcfg


def set_trainable(chunks: list[torch.nn.Module], stage: StageSection) -> list[str]:
    """``requires_grad`` per stage; returns the names of trainable parameters."""
    trainable = []
    for model in chunks:
        for name, p in model.named_parameters():
            p.requires_grad_(stage.trainable == "all" or is_indexer_param(name))
            if p.requires_grad:
                trainable.append(name)
        for module in model.modules():
            if hasattr(module, "expert_bias"):
                # Aux-loss-free balancing updates the router bias from token counts; a frozen
                # trunk (warm-up) must keep its routing unchanged.
                module.frozen_expert_bias = stage.trainable != "all"
    return trainable


@dataclass
class Wrapped:
    """What a recipe stage trains with."""

    ddp_chunks: list[DistributedDataParallel]
    optimizer: object  # MegatronOptimizer / ChainedOptimizer
    trainable: list[str]


def wrap_stage(
    cfg: TrainConfig,
    chunks: list[IndexCacheGPTModel],
    tcfg: TransformerConfig,
    stage: StageSection,
    finalize_func: Callable[..., Any] = finalize_model_grads,
) -> Wrapped:
    trainable = set_trainable(chunks, stage)
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    ddp_chunks = [
        DistributedDataParallel(tcfg, ddp_cfg, model, disable_bucketing=(i > 0))
        for i, model in enumerate(chunks)
    ]
    # Megatron's finalize (grad all-reduce, expert-bias update), or a wrapper of it that also
    # reads the routers' token counts (training.moe_metrics).
    tcfg.finalize_model_grads_func = finalize_func
    if len(ddp_chunks) > 1:
        tcfg.no_sync_func = [c.no_sync for c in ddp_chunks]
    opt_cfg = optimizer_config(cfg, stage)
    optimizer = get_megatron_optimizer(
        opt_cfg, ddp_chunks, config_overrides=param_group_overrides(opt_cfg, stage)
    )
    return Wrapped(ddp_chunks, optimizer, trainable)


def unwrap(wrapped: Wrapped) -> list[IndexCacheGPTModel]:
    return [c.module for c in wrapped.ddp_chunks]


def optimizer_config(cfg: TrainConfig, stage: StageSection) -> OptimizerConfig:
    o = cfg.optim
    return OptimizerConfig(
        optimizer=o.optimizer,
        lr=stage.lr,
        min_lr=stage.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=o.bf16,
        params_dtype=torch.bfloat16 if o.bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )


def param_group_overrides(opt_cfg: OptimizerConfig, stage: StageSection) -> dict:
    """Megatron's standard groups (no weight decay on norms/biases) plus an indexer lr group."""
    overrides = get_standard_config_overrides(opt_cfg)
    if stage.indexer_lr is not None:
        # ``max_lr`` is the per-group peak Megatron's scheduler reads; training.lr scales it.
        overrides[ParamKey(name="*core_attention.indexer.*")] = {"max_lr": stage.indexer_lr}
    return overrides


# ---------------------------------------------------------------------- state carry-over
def _dist_optimizers(optimizer) -> list:
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not all(isinstance(o, DistributedOptimizer) for o in inner):
        raise ValueError(
            "carrying optimizer state across a recipe stage switch needs "
            "parallel.use_distributed_optimizer=true"
        )
    return inner


@torch.no_grad()
def export_optimizer_state(
    wrapped: Wrapped, names: list[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """Full (unsharded) fp32 main param and Adam moments of ``names``, identical on all DP ranks."""
    params = {n: p for c in unwrap(wrapped) for n, p in c.named_parameters()}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for opt in _dist_optimizers(wrapped.optimizer):
        group = opt.data_parallel_group
        for name in names:
            p = params[name]
            # Participation must not depend on this rank's shard (a rank owning no piece of p
            # must still join the all-reduce): use buffer membership, identical on all ranks.
            if not any(p in buf.param_index_map for buf in opt.buffers):
                continue
            full: dict[str, torch.Tensor] = {}
            step = torch.zeros((), dtype=torch.float64, device=p.device)
            if p in opt.model_param_group_index_map:
                rng = opt._get_model_param_range_map(p)["param"]
                for k, v in opt._get_main_param_and_optimizer_states(p).items():
                    if v.numel() == 1 and k == "step":
                        # torch's Adam keeps `step` on the CPU; NCCL reduces device tensors only.
                        step = v.double().reshape(()).to(p.device)
                        continue
                    t = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                    t[rng.start : rng.end] = v.float().view(-1)
                    full[k] = t
            for k in ("param", "exp_avg", "exp_avg_sq"):
                t = full.setdefault(k, torch.zeros(p.numel(), dtype=torch.float32, device=p.device))
                dist.all_reduce(t, group=group)  # disjoint shards: the sum assembles the tensor
            dist.all_reduce(step, op=dist.ReduceOp.MAX, group=group)
            full["step"] = step
            out[name] = full
    return out


@torch.no_grad()
def init_optimizer_state(optimizer, step: float = 0.0) -> None:
    """Materialise Adam state (zero moments, ``step``) for every parameter.

    torch optimizers create state lazily at the first step, but Megatron 0.19.2's
    ``DistributedOptimizer.state_dict`` (called to build a sharded state dict, also for loading)
    asserts that every parameter has a ``step``.
    """
    for opt in _dist_optimizers(optimizer):
        opt.init_state_fn(opt.optimizer, opt.config)
        for group in opt.optimizer.param_groups:
            for main in group["params"]:
                opt.optimizer.state[main]["step"] = torch.tensor(step, dtype=torch.float32)


@torch.no_grad()
def ensure_optimizer_state(optimizer) -> None:
    """Create zero Adam state (step 0) where no update has created it, as torch's first update
    would: a stage whose every update was skipped (``optim.on_nonfinite=skip``) has none, and
    Megatron 0.19.2's ``DistributedOptimizer.state_dict`` (a checkpoint save) asserts a
    ``step`` per parameter. Existing state is left as it is."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or opt.init_state_fn is None:
            continue
        opt.init_state_fn(opt.optimizer, opt.config)  # fills only empty states
        for group in opt.optimizer.param_groups:
            for main in group["params"]:
                opt.optimizer.state[main].setdefault("step", torch.tensor(0.0))


@torch.no_grad()
def import_optimizer_state(wrapped: Wrapped, state: dict[str, dict[str, torch.Tensor]]) -> int:
    """Load carried state into the new optimizer's shards; returns how many params received it.

    Megatron's distributed optimizer keeps a single Adam step for all parameters (asserted in
    ``DistributedOptimizer.state_dict``), so every parameter of the new stage starts at the
    carried step: continuing parameters resume exactly, new ones start from zero moments with
    an already-decayed bias correction (their first updates are smaller than a fresh Adam's,
    like an extra LR warm-up).
    """
    if not state:
        return 0
    step = max(float(s["step"]) for s in state.values())
    params = {n: p for c in unwrap(wrapped) for n, p in c.named_parameters()}
    loaded = 0
    init_optimizer_state(wrapped.optimizer, step)
    for opt in _dist_optimizers(wrapped.optimizer):
        for name, full in state.items():
            p = params.get(name)
            if p is None or p not in opt.model_param_group_index_map:
                continue
            rng = opt._get_model_param_range_map(p)["param"]
            group_index, group_order = opt.model_param_group_index_map[p]
            main = opt.optimizer.param_groups[group_index]["params"][group_order]
            st = opt.optimizer.state[main]
            main.copy_(full["param"][rng.start : rng.end].view_as(main))
            st["exp_avg"].copy_(full["exp_avg"][rng.start : rng.end].view_as(main))
            st["exp_avg_sq"].copy_(full["exp_avg_sq"][rng.start : rng.end].view_as(main))
            loaded += 1
    return loaded


def switch_stage(
    cfg: TrainConfig,
    wrapped: Wrapped,
    tcfg: TransformerConfig,
    stage: StageSection,
    finalize_func: Callable[..., Any] = finalize_model_grads,
) -> Wrapped:
    """Re-wrap for ``stage``, carrying the optimizer state of parameters trained before and after."""
    chunks = unwrap(wrapped)
    continuing = [n for n in wrapped.trainable]
    carried = export_optimizer_state(wrapped, continuing)
    for c in wrapped.ddp_chunks:
        for p in c.module.parameters():
            for attr in ("main_grad", "main_param", "grad"):
                if hasattr(p, attr):
                    setattr(p, attr, None)
    new = wrap_stage(cfg, chunks, tcfg, stage, finalize_func)
    import_optimizer_state(new, {n: s for n, s in carried.items() if n in set(new.trainable)})
    return replace(new)
