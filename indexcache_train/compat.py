"""Every adjustment we make to Megatron-Core 0.19.2 and its environment, in one place.

Megatron-Core is written for CUDA machines with Transformer Engine (TE). Our machines have either
no GPU (CPU development, CI) or a GPU without TE/apex (the lent H100/H200). No other module of
this package patches Megatron; each fix below names the Megatron version and function it works
around and has a test in ``tests/unit/test_compat.py`` that shows the failure without it
(each fix can be switched off with ``INDEXCACHE_COMPAT_DISABLE=<name>[,<name>...]``).

Three kinds of fixes:

(a) Needed whenever TE does not import (CPU *and* the GPU machine):
    * ``duplicated_linear``: DSA indexer projections are replicated on every TP rank; Megatron only
      offers TE's ``parallel_mode="duplicated"`` linear. :class:`DuplicatedLinear` is a plain
      linear with Megatron's constructor kwargs and ``(out, bias)`` return.
    * SP-capable norms: Megatron's torch norm wrapper (``WrappedTorchNorm``) refuses
      ``sequence_parallel=True`` (MoE with TP requires SP). :class:`RMSNorm` / :class:`LayerNorm`
      tag their weights ``sequence_parallel`` so Megatron all-reduces their gradients over TP,
      like TE's norms.
    * ``indexer_grad_norm_group``: Megatron-Core 0.19.2 clips registered parameter groups on their
      own norm (``MegatronOptimizer.clip_grad_norm``), but only knows ``"mtp"``
      (``optimizer.SEPARATE_GRAD_NORM_GROUPS``); we register ``"indexer"`` so the indexers'
      distillation gradients stay out of the trunk's clipping norm.
    * ``distopt_mixed_dtype_order``: with bf16, ``DistributedOptimizer`` (0.19.2,
      ``_build_model_and_main_param_groups``) reorders each optimizer group to
      ``[fp32 params..., fp32 copies of bf16 params...]`` but keeps ``model_param_group_index_map``
      in buffer order, so ``_get_main_param_and_optimizer_states`` returns another parameter's
      main param and Adam moments whenever a group mixes dtypes. Ours do: the indexer's
      ``weights_proj`` stays fp32 like HF's. Symptoms: checkpoint save asserts in
      ``sharded_param_state_dp_reshardable``; state carried across a stage switch goes to the
      wrong parameter. We rebuild the map in the order the groups actually have.
    * ``distopt_reshardable_step``: loading a ``fully_reshardable`` distributed-optimizer
      checkpoint (the format that resumes under another TP / PP / EP / CP layout) passes the
      per-parameter state without ``step`` (0.19.2 ``load_parameter_state_from_fully_reshardable``
      restores it from the param groups), but ``_set_main_param_and_optimizer_states`` copies
      every tensor of the torch optimizer's state, and torch's Adam (the fallback without TE /
      apex) keeps ``step`` there as a tensor: ``KeyError: 'step'``. Missing keys are skipped.
    (MLA's mocked TE classes and the MoE router's ``te_general_gemm`` needed fixes in 0.16.1; we
    use our own MLA module and 0.19.2's router has a torch fallback, so neither is patched here.)

(b) Needed only without CUDA (CPU tests and development):
    * ``current_device``: ``torch.cuda.current_device()`` is called for tensor placement in
      ``TopKRouter.__init__`` (moe/router.py), ``_ParamAndGradBuffer`` and the optimizers;
      it returns the CPU device here.
    * ``rng_tracker``: ``model_parallel_cuda_manual_seed`` fails inside ``CudaRNGStatesTracker.add``
      (``torch.cuda.get_rng_state``); :func:`model_parallel_seed` uses the no-op inference tracker.
    * ``cuda_literals``: ``"cuda"`` device literals in ``DistributedOptimizer`` / grad-norm /
      ``schedules`` token counters / dist-checkpointing exchanges are redirected to the CPU.
    * ``cuda_streams``: CUDA stream/event calls in gradient reduction (``start_grad_sync``), DDP
      construction and the alltoall MoE dispatcher become null streams (CPU runs in order).
    * ``checkpoint_rng``: activation checkpointing saves/restores the CUDA RNG state
      (``tensor_parallel.random._get_cuda_rng_state``); on CPU there is none to keep.
    * ``cpu_grad_norm``: torch's CPU fp32 norm kernel sums large tensors inaccurately (4e-4
      relative on a 3.2M-element LM-head gradient, where a float64 sum is exact to 1e-8; CUDA's
      tree reduction is not affected), and Megatron's no-apex gradient norm
      (``clip_grads.get_grad_norm_fp32`` -> ``utils.local_multi_tensor_l2_norm``) adds up
      per-tensor ``torch.norm`` values: the logged and clipping norm then changed with how
      tensor parallelism shards a tensor. The squares are summed in float64 instead.
    * gloo: :func:`distributed_backend` picks gloo without CUDA.

(c) Environment: ``OMP_NUM_THREADS=1`` (a second busy process slowed a CPU forward 40x) and
    ``TORCHDYNAMO_DISABLE=1`` on CPU (the first MoE forward otherwise spends ~30 s compiling).

CPU support is a test/development mode: nothing here changes numerics, except that the CPU
gradient norm is summed exactly (``cpu_grad_norm``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "DuplicatedLinear",
    "LayerNorm",
    "RMSNorm",
    "applied_fixes",
    "apply",
    "distributed_backend",
    "has_cuda",
    "model_parallel_seed",
]

_APPLIED: list[str] = []
_DISABLED_ENV = "INDEXCACHE_COMPAT_DISABLE"


def has_cuda() -> bool:
    return torch.cuda.is_available()


def _disabled(name: str) -> bool:
    return name in {s.strip() for s in os.environ.get(_DISABLED_ENV, "").split(",") if s.strip()}


def applied_fixes() -> tuple[str, ...]:
    """Names of the fixes :func:`apply` installed in this process."""
    return tuple(_APPLIED)


def set_environment() -> None:
    """(c) Environment defaults; must run before torch spins up its thread pools."""
    if not has_cuda():
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def distributed_backend() -> str:
    """NCCL on GPUs, gloo on CPU."""
    return "nccl" if has_cuda() else "gloo"


def apply() -> tuple[str, ...]:
    """Install every fix this machine needs; idempotent. Returns the names applied."""
    set_environment()
    for name, fix in _ALWAYS_FIXES.items():
        if name not in _APPLIED and not _disabled(name):
            fix()
            _APPLIED.append(name)
    if not has_cuda():
        for name, fix in _CPU_FIXES.items():
            if name not in _APPLIED and not _disabled(name):
                fix()
                _APPLIED.append(name)
    return applied_fixes()


# ---------------------------------------------------------------------- (a) fixes on every machine
INDEXER_GRAD_NORM_GROUP = "indexer"


def _fix_indexer_grad_norm_group() -> None:
    from megatron.core.optimizer import optimizer as mopt

    if INDEXER_GRAD_NORM_GROUP not in mopt.SEPARATE_GRAD_NORM_GROUPS:
        mopt.SEPARATE_GRAD_NORM_GROUPS = (*mopt.SEPARATE_GRAD_NORM_GROUPS, INDEXER_GRAD_NORM_GROUP)


def _fix_distopt_mixed_dtype_order() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    init = DistributedOptimizer.__init__

    def init_with_ordered_map(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        # Both branches of 0.19.2 put fp32 params first, then the (copies of) 16-bit params.
        for group_index, (fp32, half) in enumerate(
            zip(self.model_fp32_groups, self.model_float16_groups, strict=True)
        ):
            for order, model_param in enumerate([*fp32, *half]):
                self.model_param_group_index_map[model_param] = (group_index, order)

    DistributedOptimizer.__init__ = init_with_ordered_map  # type: ignore[method-assign]


def _fix_distopt_reshardable_step() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_present_states(self, model_param: Any, tensors: dict) -> None:
        group_index, group_order = self.model_param_group_index_map[model_param]
        main = self.optimizer.param_groups[group_index]["params"][group_order]
        # Megatron skips entries that are not tensors: mark the state keys the checkpoint lacks.
        absent = {k: None for k in self.optimizer.state.get(main, {}) if k not in tensors}
        set_states(self, model_param, {**tensors, **absent})

    DistributedOptimizer._set_main_param_and_optimizer_states = set_present_states  # type: ignore[method-assign]


_ALWAYS_FIXES: dict[str, Callable[[], None]] = {
    "indexer_grad_norm_group": _fix_indexer_grad_norm_group,
    "distopt_mixed_dtype_order": _fix_distopt_mixed_dtype_order,
    "distopt_reshardable_step": _fix_distopt_reshardable_step,
}


# ---------------------------------------------------------------------- (b) CPU-only fixes
def _fix_current_device() -> None:
    # Megatron-Core 0.19.2 places buffers with device=torch.cuda.current_device() (TopKRouter,
    # _ParamAndGradBuffer, optimizers); without CUDA that raises "Torch not compiled with CUDA".
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]


class _CudaLiteralsToCPU(TorchFunctionMode):
    """Rewrites ``device="cuda"`` / ``.cuda()`` / ``.to("cuda")`` to the CPU (CPU mode only)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Dtype checks spelled as CUDA type strings ("torch.cuda.FloatTensor") in
            # DistributedOptimizer / Float16OptimizerWithFloat16Params.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not args[0].is_cuda else name
        if func is torch.Tensor.to and args:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


def _is_cuda(value: Any) -> bool:
    return isinstance(value, (str, torch.device)) and str(value).startswith("cuda")


_CPU_MODE: _CudaLiteralsToCPU | None = None


def _fix_cuda_literals() -> None:
    # Megatron-Core 0.19.2 allocates with device="cuda" literals in its training-loop code:
    # MixedPrecisionOptimizer.__init__ (``_dummy_overflow_buf``), DistributedOptimizer, clip_grads,
    # the schedules' token counters and dist-checkpointing exchanges, and checks dtypes with
    # ``param.type() == "torch.cuda.FloatTensor"``. A process-wide TorchFunctionMode maps those
    # allocations to the CPU and answers the type checks; nothing else is changed.
    global _CPU_MODE
    _CPU_MODE = _CudaLiteralsToCPU()
    _CPU_MODE.__enter__()
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda *a, **k: None  # type: ignore[assignment]


class _NullStream:
    """Stands in for ``torch.cuda.Stream`` / ``Event`` on CPU: every operation is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        # wait_stream, wait_event, record_event, synchronize, query, record, ...
        return lambda *a, **k: True if name == "query" else None


def _fix_cuda_streams() -> None:
    # Megatron-Core 0.19.2 orders gradient reduction with CUDA streams
    # (``_ParamAndGradBucketGroup.start_grad_sync``: ``torch.cuda.current_stream()``;
    # ``DistributedDataParallel.__init__``: ``torch.cuda.Stream``) and the alltoall MoE dispatcher
    # creates a stream and events in ``MoEAlltoAllTokenDispatcher.__init__``. On CPU everything
    # runs in program order, so null streams/events are exact.
    import contextlib

    torch.cuda.current_stream = lambda *a, **k: _NullStream()  # type: ignore[assignment]
    torch.cuda.Stream = _NullStream  # type: ignore[assignment,misc]
    torch.cuda.Event = _NullStream  # type: ignore[assignment,misc]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]


def _fix_checkpoint_rng() -> None:
    # Megatron-Core 0.19.2 activation checkpointing (``CheckpointFunction`` via
    # ``_get_all_rng_states`` / ``_set_all_rng_states`` / ``_fork_rng``) saves and restores the
    # CUDA RNG state with ``_get_cuda_rng_state`` / ``_set_cuda_rng_state``. Without CUDA there
    # is no such state; the CPU generator is still saved and restored by the same functions.
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: None
    mrandom._set_cuda_rng_state = lambda *a, **k: None


def _fix_rng_tracker() -> None:
    # Nothing to patch globally: model_parallel_seed() below picks the inference tracker on CPU.
    pass


def _fix_cpu_grad_norm() -> None:
    from megatron.core.optimizer import clip_grads

    def l2_norm(chunk_size: int, noop_flag: Any, tensor_lists: list, *args: Any):
        squares = sum(
            float(torch.linalg.vector_norm(t, dtype=torch.float64).square())
            for tensors in tensor_lists
            for t in tensors
        )
        return torch.tensor([squares**0.5], dtype=torch.float32), None

    clip_grads.l2_norm_impl = l2_norm


_CPU_FIXES: dict[str, Callable[[], None]] = {
    "current_device": _fix_current_device,
    "cuda_literals": _fix_cuda_literals,
    "cuda_streams": _fix_cuda_streams,
    "checkpoint_rng": _fix_checkpoint_rng,
    "rng_tracker": _fix_rng_tracker,
    "cpu_grad_norm": _fix_cpu_grad_norm,
}


def model_parallel_seed(seed: int) -> None:
    """Seed torch and Megatron's model-parallel RNG tracker (no-op tracker without CUDA).

    Megatron-Core 0.19.2 ``model_parallel_cuda_manual_seed`` calls ``torch.cuda.get_rng_state``
    in ``CudaRNGStatesTracker.add``; on CPU we build the inference tracker, whose ``add`` and
    ``fork`` do nothing (we use no dropout, so nothing draws from the tracked states).
    """
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    use_noop = not has_cuda() and not _disabled("rng_tracker")
    tensor_parallel.model_parallel_cuda_manual_seed(
        seed, inference_rng_tracker=use_noop, force_reset_rng=True
    )


# ---------------------------------------------------------------------- (a) no-TE modules
class DuplicatedLinear(torch.nn.Module):
    """A linear layer replicated on every tensor-parallel rank (TE's ``parallel_mode="duplicated"``).

    Accepts Megatron's linear constructor kwargs and returns ``(output, bias)`` like Megatron's
    parallel linears. The parameters are identical on all TP ranks and every rank computes the
    same gradient from the same (gathered) inputs, so DDP must *average* (not sum) them over TP:
    they are tagged ``average_gradients_across_tp_domain`` exactly like Megatron's own DSA indexer.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: Any,
        init_method: Callable[[torch.Tensor], Any] | None = None,
        bias: bool = False,
        skip_bias_add: bool = False,
        params_dtype: torch.dtype | None = None,
        **_megatron_kwargs: Any,
    ) -> None:
        super().__init__()
        dtype = params_dtype or getattr(config, "params_dtype", torch.float32)
        device = (
            "cpu"
            if getattr(config, "use_cpu_initialization", True)
            else torch.cuda.current_device()
        )
        self.weight = torch.nn.Parameter(
            torch.empty(output_size, input_size, dtype=dtype, device=device)
        )
        if init_method is not None and getattr(config, "perform_initialization", True):
            init_method(self.weight)
        self.bias = (
            torch.nn.Parameter(torch.zeros(output_size, dtype=dtype, device=device))
            if bias
            else None
        )
        self.skip_bias_add = skip_bias_add
        for p in self.parameters():
            p.average_gradients_across_tp_domain = True  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.skip_bias_add:
            return torch.nn.functional.linear(x, self.weight.to(x.dtype)), self.bias
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias), None


class _SPNorm(torch.nn.Module):
    """Base of our torch norms: Megatron's constructor signature, sequence-parallel capable.

    Megatron-Core 0.19.2 ``WrappedTorchNorm.__init__`` asserts ``not config.sequence_parallel``,
    but MoE with TP requires SP. Under SP each TP rank normalises a different slice of tokens with
    replicated weights, so the weight gradients are partial sums; tagging them
    ``sequence_parallel`` makes Megatron's ``finalize_model_grads`` all-reduce them over TP,
    which is what TE's norms do.
    """

    def _tag(self, config: Any) -> None:
        for p in self.parameters():
            p.sequence_parallel = bool(getattr(config, "sequence_parallel", False))  # type: ignore[attr-defined]


class RMSNorm(_SPNorm):
    """RMSNorm computed in fp32 and cast back, as HF's ``GlmMoeDsaRMSNorm`` does."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **_: Any) -> None:
        super().__init__()
        dtype = getattr(config, "params_dtype", torch.float32)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps
        self._tag(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LayerNorm(_SPNorm):
    """LayerNorm with weight and bias (the indexer's ``k_norm``), computed in fp32."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **_: Any) -> None:
        super().__init__()
        dtype = getattr(config, "params_dtype", torch.float32)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        self.eps = eps
        self._tag(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.layer_norm(
            x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(), self.eps
        )
        return y.to(x.dtype)
