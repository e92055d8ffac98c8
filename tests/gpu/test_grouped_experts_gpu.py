"""Grouped-GEMM MoE experts on the GPU (bf16 ``torch._grouped_mm``) against ``SequentialMLP``.

Both run bf16 GEMMs with fp32 accumulation; each is compared with an fp32 ``SequentialMLP`` on the
same weights and tokens, and the grouped error may be at most 2x the sequential one (plus 1e-3 of
the reference norm, for outputs where both round the same way).
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.experts import SequentialMLP

from indexcache_train.model.config import ModelConfig
from indexcache_train.model.factory import ParallelSettings, transformer_config
from indexcache_train.model.grouped_experts import GroupedExperts, use_grouped_experts
from indexcache_train.model.specs import EXPERT_MLP
from indexcache_train.model.toy_configs import glm5_toy_hf_config
from tests.helpers.megatron_env import init_single_process


@pytest.fixture(scope="module", autouse=True)
def _megatron() -> None:
    init_single_process()


def _experts(cls, hidden: int, ffn: int, n: int, dtype: torch.dtype):
    cfg = ModelConfig.from_hf_config(
        glm5_toy_hf_config(hidden_size=hidden, moe_intermediate_size=ffn, n_routed_experts=n)
    )
    par = ParallelSettings(
        params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=False
    )
    tcfg = transformer_config(cfg, par)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    return cls(n, tcfg, EXPERT_MLP, pg_collection=pgs).cuda()


def _run(experts, x, counts, probs, dout):
    x, probs = x.clone().requires_grad_(), probs.clone().requires_grad_()
    out, _ = experts(x, counts, probs)
    out.backward(dout.to(out.dtype))
    grads = [p.grad.float() for p in experts.parameters()]
    return [out.float(), x.grad.float(), probs.grad.float(), *grads]


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.parametrize(
    ("hidden", "ffn", "n", "tokens"), [(64, 32, 8, 500), (6144, 2048, 8, 4096)]
)
def test_grouped_matches_sequential_in_bf16(hidden: int, ffn: int, n: int, tokens: int) -> None:
    assert use_grouped_experts("auto", torch.device("cuda"), torch.bfloat16)
    torch.manual_seed(0)
    seq = _experts(SequentialMLP, hidden, ffn, n, torch.bfloat16)
    grp = _experts(GroupedExperts, hidden, ffn, n, torch.bfloat16)
    ref = _experts(SequentialMLP, hidden, ffn, n, torch.float32)
    grp.load_state_dict(seq.state_dict())
    ref.load_state_dict(
        {k: v.float() if torch.is_tensor(v) else v for k, v in seq.state_dict().items()}
    )
    # Uneven groups with an empty expert (the dispatcher's order: grouped by expert).
    w = torch.rand(n, generator=torch.Generator().manual_seed(1))
    w[1] = 0
    counts = (w / w.sum() * tokens).long()
    x = torch.randn(int(counts.sum()), hidden, device="cuda")
    probs = torch.rand(x.shape[0], device="cuda")
    dout = torch.randn(x.shape[0], hidden, device="cuda")

    calls = []
    real = torch._grouped_mm

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    torch._grouped_mm = counting
    try:
        got = _run(grp, x.bfloat16(), counts, probs, dout)
    finally:
        torch._grouped_mm = real
    assert len(calls) == 6  # fc1, fc2 forward; dx and dW of each in the backward
    base = _run(seq, x.bfloat16(), counts, probs, dout)
    exact = _run(ref, x, counts, probs, dout)
    for i, (g, s, r) in enumerate(zip(got, base, exact, strict=True)):
        assert _err(g, r) <= 2 * _err(s, r) + 1e-3, (i, _err(g, r), _err(s, r))
    assert got[3 + 2].abs().max() == 0  # expert 1 (fc1 weight) saw no tokens
