"""Grouped-GEMM MoE experts (``model/grouped_experts.py``) against Megatron's ``SequentialMLP``.

Same parameters and checkpoint keys; same outputs and gradients on the toy MoE, through
``torch._grouped_mm`` (it runs on CPU in torch 2.13) and through the per-expert fallback. On this
CPU both are bitwise equal to ``SequentialMLP`` (measured 0.0 everywhere); the tolerances leave
room for another summation order only: 1e-6 relative in fp32, 1e-2 (a few bf16 roundings) in bf16.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.experts import SequentialMLP

from indexcache_train.config.compose import compose
from indexcache_train.config.validate import ConfigError, validate
from indexcache_train.model import grouped_experts
from indexcache_train.model.factory import transformer_config
from indexcache_train.model.forward_state import DistillSettings
from indexcache_train.model.grouped_experts import GroupedExperts, use_grouped_experts
from indexcache_train.model.specs import EXPERT_MLP, LOCAL_GROUPED
from indexcache_train.model.toy_configs import glm5_toy_hf_config
from tests.helpers.megatron_env import init_single_process
from tests.helpers.models import CPU_PARALLEL, build_toy, state

B, S = 2, 24
HF = glm5_toy_hf_config(num_hidden_layers=3, index_topk_freq=2, index_skip_topk_offset=1)


@pytest.fixture(scope="module", autouse=True)
def _megatron() -> None:
    init_single_process()


def _pair(par=CPU_PARALLEL):
    torch.manual_seed(0)
    cfg, seq = build_toy(HF, par)
    torch.manual_seed(0)
    _, grp = build_toy(HF, par, backend=LOCAL_GROUPED)
    return cfg, seq, grp


def _tokens(n_experts: int, hidden: int, dtype: torch.dtype):
    # Uneven groups with an empty expert, as the dispatcher delivers them (grouped by expert).
    counts = torch.tensor([5, 0, 9, 1] + [3] * (n_experts - 4))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(int(counts.sum()), hidden, generator=g).to(dtype)
    probs = torch.rand(x.shape[0], generator=g)
    return x, counts, probs


def _run(experts, x, counts, probs):
    x, probs = x.clone().requires_grad_(), probs.clone().requires_grad_()
    out, bias = experts(x, counts, probs)
    assert bias is None
    g = torch.Generator().manual_seed(2)
    (out.float() * torch.randn(out.shape, generator=g)).sum().backward()
    grads = {n: p.grad.float().clone() for n, p in experts.named_parameters()}
    return out.float(), x.grad.float(), probs.grad.float(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_same_parameters_and_checkpoint_keys() -> None:
    _, seq, grp = _pair()
    experts = grp.decoder.layers[1].mlp.experts
    assert type(experts) is GroupedExperts
    assert type(seq.decoder.layers[1].mlp.experts) is SequentialMLP
    sd_seq, sd_grp = seq.state_dict(), grp.state_dict()
    assert list(sd_seq) == list(sd_grp)
    assert all(
        torch.equal(sd_seq[k], sd_grp[k]) for k in sd_seq if isinstance(sd_seq[k], torch.Tensor)
    )
    sh_seq, sh_grp = seq.sharded_state_dict(), grp.sharded_state_dict()
    assert sorted(sh_seq) == sorted(sh_grp)
    assert {k: v.key for k, v in sh_seq.items() if hasattr(v, "key")} == {
        k: v.key for k, v in sh_grp.items() if hasattr(v, "key")
    }


@pytest.mark.parametrize("path", ["grouped_mm", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_match_sequential_mlp(path: str, dtype: torch.dtype, monkeypatch) -> None:
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    if path == "loop":
        monkeypatch.setattr(grouped_experts, "grouped_mm_runs_on", lambda *a: False)
    _, seq, grp = _pair()
    e_seq, e_grp = seq.decoder.layers[1].mlp.experts.to(dtype), grp.decoder.layers[1].mlp.experts
    e_grp.to(dtype)
    x, counts, probs = _tokens(len(e_seq.local_experts), 64, dtype)
    ref, got = _run(e_seq, x, counts, probs), _run(e_grp, x, counts, probs)
    # forward, fc1 backward (dx, dW) and fc2 backward (dx, dW) each go through the grouped path
    assert len(calls) == (0 if path == "loop" else 6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for name, a, b in zip(("out", "dx", "dprobs"), got[:3], ref[:3], strict=True):
        assert _rel(a, b) <= tol, name
    assert got[3].keys() == ref[3].keys()
    for name in ref[3]:
        assert _rel(got[3][name], ref[3][name]) <= tol, name
    # The empty expert gets exactly zero gradient.
    assert got[3]["local_experts.1.linear_fc1.weight"].abs().max() == 0


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_model_loss_and_gradients_match(attention: str) -> None:
    cfg, seq, grp = _pair()
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(S).expand(B, S)
    out = {}
    for name, model in (("seq", seq), ("grp", grp)):
        st = state(cfg, B, S, attention=attention, distill=DistillSettings(mode="multi"))
        loss = model(ids, pos, None, labels=ids.roll(-1, 1), dsa_state=st)
        loss.mean().backward()
        out[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert _rel(out["grp"][0], out["seq"][0]) <= 1e-6
    experts = [n for n in out["seq"][1] if ".experts.local_experts." in n]
    assert experts and out["grp"][1].keys() == out["seq"][1].keys()
    for n, g in out["seq"][1].items():
        assert _rel(out["grp"][1][n], g) <= 1e-6, n


def test_setting_resolution() -> None:
    cpu = torch.device("cpu")
    assert use_grouped_experts("true", cpu, torch.float32)
    assert use_grouped_experts("True", cpu, torch.float32)  # YAML / Hydra booleans arrive so
    assert not use_grouped_experts("false", cpu, torch.bfloat16)
    assert not use_grouped_experts("auto", cpu, torch.bfloat16)  # auto: GPUs only
    with pytest.raises(ValueError, match="moe_grouped_gemm"):
        use_grouped_experts("yes", cpu, torch.float32)


def test_config_option_selects_the_module_and_is_validated() -> None:
    from indexcache_train.training.model_setup import build_chunks

    cfg = compose(["model.moe_grouped_gemm=true", "parallel=single"])
    resolved = validate(cfg, 1)
    chunks, _ = build_chunks(cfg, resolved.model, None, torch.device("cpu"))
    assert type(chunks[0].decoder.layers[1].mlp.experts) is GroupedExperts
    with pytest.raises(ConfigError, match="moe_grouped_gemm='maybe'"):
        validate(compose(["model.moe_grouped_gemm=maybe"]), 1)


def test_unsupported_mlp_settings_are_refused() -> None:
    cfg, _, _ = _pair()
    tcfg = dataclasses.replace(transformer_config(cfg, CPU_PARALLEL), add_bias_linear=True)
    with pytest.raises(ValueError, match="add_bias_linear"):
        GroupedExperts(
            4, tcfg, EXPERT_MLP, pg_collection=ProcessGroupCollection.use_mpu_process_groups()
        )
