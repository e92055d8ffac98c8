"""Routed experts as one grouped GEMM per projection: a drop-in for Megatron's ``SequentialMLP``.

:class:`GroupedExperts` subclasses ``SequentialMLP`` and keeps its constructor, so the parameters
(``local_experts.<i>.linear_fc1/linear_fc2.weight``), state-dict keys and ``sharded_state_dict``
are Megatron's: the HF mapping, distributed checkpoints and export see no difference. Only the
forward changes: instead of a Python loop of two matmuls per expert (after a host sync for the
split sizes), fc1 and fc2 each run as one ``torch._grouped_mm`` over all local experts' tokens.

The expert weights are stacked per call (a copy of the layer's expert weights in their dtype,
freed after the matmul) and stacked again in the backward instead of being saved. Where
``torch._grouped_mm`` cannot run (CUDA below sm_90 or not bf16; strides not 16-byte aligned) the
same autograd function loops over the experts with ``torch.mm``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.transformer_config import TransformerConfig

SETTINGS = ("auto", "true", "false")


def grouped_mm_runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` computes ``dtype`` on ``device`` (alignment aside)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float32)


def use_grouped_experts(setting: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Resolve ``model.moe_grouped_gemm``: ``auto`` = grouped where the GPU runs the grouped GEMM."""
    setting = setting.lower()
    if setting not in SETTINGS:
        raise ValueError(f"moe_grouped_gemm={setting!r}: use one of {SETTINGS}")
    if setting == "auto":
        return device.type == "cuda" and grouped_mm_runs_on(device, dtype)
    return setting == "true"


def _aligned(*tensors: torch.Tensor) -> bool:
    # torch._grouped_mm needs 16-byte aligned data pointers and leading strides.
    for t in tensors:
        if t.data_ptr() % 16 or any(s != 1 and (s * t.element_size()) % 16 for s in t.stride()):
            return False
    return True


def _bounds(offs_G: torch.Tensor) -> list[int]:
    return [0, *offs_G.tolist()]


def _mm_rows(a_RK: torch.Tensor, b_GKN: torch.Tensor, offs_G: torch.Tensor) -> torch.Tensor:
    """Rows of group g of ``a`` times ``b[g]``: ``[R, K] x [G, K, N] -> [R, N]``."""
    if grouped_mm_runs_on(a_RK.device, a_RK.dtype) and _aligned(a_RK, b_GKN):
        return torch._grouped_mm(a_RK, b_GKN, offs=offs_G)
    ends = _bounds(offs_G)
    out = a_RK.new_empty(a_RK.shape[0], b_GKN.shape[-1])
    for g in range(b_GKN.shape[0]):
        torch.mm(a_RK[ends[g] : ends[g + 1]], b_GKN[g], out=out[ends[g] : ends[g + 1]])
    return out


def _mm_groups(a_NR: torch.Tensor, b_RK: torch.Tensor, offs_G: torch.Tensor) -> torch.Tensor:
    """Per group g, its columns of ``a`` times its rows of ``b``: ``[N, R] x [R, K] -> [G, N, K]``."""
    if grouped_mm_runs_on(a_NR.device, a_NR.dtype) and _aligned(a_NR, b_RK):
        return torch._grouped_mm(a_NR, b_RK, offs=offs_G)
    ends = _bounds(offs_G)
    out = a_NR.new_empty(len(ends) - 1, a_NR.shape[0], b_RK.shape[1])
    for g in range(len(ends) - 1):
        torch.mm(a_NR[:, ends[g] : ends[g + 1]], b_RK[ends[g] : ends[g + 1]], out=out[g])
    return out


class _GroupedLinear(torch.autograd.Function):
    """``y[rows of g] = x[rows of g] @ W_g^T`` with ``W_g`` in ``torch.nn.Linear`` layout.

    Saves ``x`` and references to the weights (not their stacked copy)."""

    @staticmethod
    def forward(ctx, x_RK: torch.Tensor, offs_G: torch.Tensor, *weights: torch.Tensor):
        ctx.save_for_backward(x_RK, offs_G, *weights)
        return _mm_rows(x_RK, torch.stack(weights).transpose(1, 2), offs_G)

    @staticmethod
    def backward(ctx, grad_RN: torch.Tensor):
        x_RK, offs_G, *weights = ctx.saved_tensors
        grad_RN = grad_RN.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _mm_rows(grad_RN, torch.stack(weights), offs_G)
        if any(ctx.needs_input_grad[2:]):
            grad_w = _mm_groups(grad_RN.t(), x_RK, offs_G).unbind(0)
        return grad_x, None, *(grad_w or [None] * len(weights))


def grouped_linear(
    x_RK: torch.Tensor, tokens_per_group: torch.Tensor, weights: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``x``'s rows in consecutive groups (``tokens_per_group``), group g times ``weights[g].T``."""
    offs_G = tokens_per_group.to(device=x_RK.device, dtype=torch.int64).cumsum(0).to(torch.int32)
    return _GroupedLinear.apply(x_RK.contiguous(), offs_G, *weights)


def _unsupported(config: TransformerConfig) -> list[str]:
    """Settings whose MLP math the grouped forward does not reproduce."""
    checks = {
        "add_bias_linear": config.add_bias_linear,
        "bias_activation_fusion": config.bias_activation_fusion,
        "use_te_activation_func": config.use_te_activation_func,
        "moe_apply_probs_on_input": config.moe_apply_probs_on_input,
        "moe_latent_size": config.moe_latent_size is not None,
        "fp8": bool(config.fp8),
        "fp4": bool(getattr(config, "fp4", None)),
    }
    return [name for name, on in checks.items() if on]


def expert_activation(config: TransformerConfig, h_RF: torch.Tensor) -> torch.Tensor:
    """Megatron ``MLP``'s unfused activation (GLU split, optional clamp, offset)."""
    if not config.gated_linear_unit:
        return config.activation_func(h_RF)
    gate, linear = torch.chunk(h_RF, 2, dim=-1)
    if (clamp := config.activation_func_clamp_value) is not None:
        gate = gate.clamp(min=None, max=clamp)
        linear = linear.clamp(min=-clamp, max=clamp)
    return config.activation_func(gate) * (linear + config.glu_linear_offset)


class GroupedExperts(SequentialMLP):
    """``SequentialMLP`` with one grouped GEMM per projection (same parameters and checkpoints)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        bad = _unsupported(self.config)
        if bad:
            raise ValueError(
                f"grouped MoE experts (model.moe_grouped_gemm) do not implement {bad}; set "
                "model.moe_grouped_gemm=false to use Megatron's SequentialMLP"
            )
        for expert in self.local_experts:
            for linear in (expert.linear_fc1, expert.linear_fc2):
                # The dispatcher does the expert communication; a linear that would itself
                # reduce over its TP group is not a plain matmul.
                if not linear.explicit_expert_comm and linear.tp_group.size() > 1:
                    raise ValueError(
                        "grouped MoE experts need expert linears without their own TP "
                        "communication; set model.moe_grouped_gemm=false"
                    )

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ) -> tuple[torch.Tensor, None]:
        """Tokens grouped by local expert (the dispatcher's order), as ``SequentialMLP``."""
        x_RH, experts = permuted_local_hidden_states, self.local_experts
        h_RF = grouped_linear(x_RH, tokens_per_expert, [e.linear_fc1.weight for e in experts])
        act_RF = expert_activation(self.config, h_RF)
        # As MLP's per_token_scale: the product in the probabilities' dtype, cast back.
        act_RF = (act_RF * permuted_probs.unsqueeze(-1)).to(act_RF.dtype)
        out_RH = grouped_linear(act_RF, tokens_per_expert, [e.linear_fc2.weight for e in experts])
        return out_RH, None
