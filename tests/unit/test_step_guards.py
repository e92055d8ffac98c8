"""Training-step guards: MoE load-balance metrics from router counts, and the non-finite guard
(``optim.on_nonfinite``: stop before the update, or skip it, with a limit on skips in a row)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from indexcache_train.training.moe_metrics import ExpertLoadTracker, load_balance_metrics
from indexcache_train.training.nonfinite import NonFiniteGuard, nonfinite_reason

pytestmark = pytest.mark.unit


def test_load_balance_metrics_by_hand() -> None:
    counts = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # dense layer 0: no router, no metric
            [4.0, 4.0, 4.0, 4.0],  # perfectly balanced
            [10.0, 2.0, 2.0, 2.0],  # one hot expert: max/mean = 10/4
            [1.0, 3.0, 1.0, 3.0],  # MTP layer (slot N=3 -> mtp0): max/mean 1.5, cv 0.5
        ],
        dtype=torch.float64,
    )
    m = load_balance_metrics(counts, num_layers=3)
    assert "moe/load_max_over_mean/layer0" not in m
    assert m["moe/load_max_over_mean/layer1"] == pytest.approx(1.0)
    assert m["moe/load_cv/layer1"] == pytest.approx(0.0)
    assert m["moe/load_max_over_mean/layer2"] == pytest.approx(2.5)
    assert m["moe/load_cv/layer2"] == pytest.approx(((6**2 + 3 * 2**2) / 4) ** 0.5 / 4)
    assert m["moe/load_max_over_mean/mtp0"] == pytest.approx(1.5)
    assert m["moe/load_cv/mtp0"] == pytest.approx(0.5)
    assert m["moe/load_max_over_mean"] == pytest.approx(2.5)
    assert m["moe/load_cv"] == pytest.approx((0.0 + m["moe/load_cv/layer2"] + 0.5) / 3)
    assert load_balance_metrics(torch.zeros(2, 4, dtype=torch.float64), 2) == {}


def test_tracker_snapshots_router_counts_before_megatron_zeroes_them() -> None:
    from indexcache_train.model.toy_configs import glm5_toy_hf_config
    from tests.helpers.megatron_env import init_single_process
    from tests.helpers.models import build_toy, state

    init_single_process()
    cfg, model = build_toy(glm5_toy_hf_config(num_hidden_layers=3, num_mtp_layers=1))
    routers = {
        n: m
        for n, m in model.named_modules()
        if getattr(m, "local_tokens_per_expert", None) is not None
    }
    assert sorted(routers) == [
        "decoder.layers.1.mlp.router",
        "decoder.layers.2.mlp.router",
        "mtp.layers.0.mtp_model_layer.mlp.router",
    ]

    def fake_finalize(*args, **kwargs):  # what Megatron's finalize does to the counts
        for r in routers.values():
            r.local_tokens_per_expert.zero_()

    tracker = ExpertLoadTracker([model], cfg, fake_finalize)
    B, S = 2, 16
    tokens = torch.randint(0, cfg.vocab_size, (B, S))
    out = model(
        tokens, torch.arange(S).expand(B, S), None, labels=tokens, dsa_state=state(cfg, B, S)
    )
    out.float().sum().backward()
    expect = {n: r.local_tokens_per_expert.clone() for n, r in routers.items()}
    # Each routed token picks num_experts_per_tok experts: the counts are the router's own.
    for n, c in expect.items():
        assert float(c.sum()) == B * S * cfg.num_experts_per_tok, n
    tracker()
    assert all(float(r.local_tokens_per_expert.sum()) == 0 for r in routers.values())
    m = tracker.metrics(torch.device("cpu"))
    for slot_name, router_name in (
        ("layer1", "decoder.layers.1.mlp.router"),
        ("layer2", "decoder.layers.2.mlp.router"),
        ("mtp0", "mtp.layers.0.mtp_model_layer.mlp.router"),
    ):
        c = expect[router_name].double()
        assert m[f"moe/load_max_over_mean/{slot_name}"] == pytest.approx(float(c.max() / c.mean()))
    assert "moe/load_max_over_mean/layer0" not in m
    # Consumed: a step whose finalize saw no counts (e.g. under no_grad) reports nothing.
    tracker()
    assert tracker.metrics(torch.device("cpu")) == {}


def _chunks(*grads: torch.Tensor) -> list:
    """DDP chunks as the guard sees them: grad buffers only."""
    chunk = SimpleNamespace(
        buffers=[SimpleNamespace(grad_data=g) for g in grads], expert_parallel_buffers=[]
    )
    return [chunk]


def _result(lm: float = 2.0, kl: dict | None = None):
    return SimpleNamespace(lm_loss=lm, kl=kl if kl is not None else {(0, 0): 0.5, (0, 1): 0.7})


def test_nonfinite_reason_names_what_went_wrong() -> None:
    cpu = torch.device("cpu")
    ok = _chunks(torch.ones(8))

    def reason(result, chunks=ok, frozen=False):
        return nonfinite_reason(result, chunks, frozen_trunk=frozen, device=cpu)

    assert reason(_result()) is None
    assert "LM loss" in reason(_result(lm=float("nan")))
    # A frozen trunk (warm-up) computes no LM gradient: its LM loss is not what trains.
    assert reason(_result(lm=float("nan")), frozen=True) is None
    r = reason(_result(kl={(0, 0): 0.5, (0, 2): float("inf")}), frozen=True)
    assert "(0, 2)" in r
    g = torch.ones(8)
    g[3] = float("nan")
    assert reason(_result(), _chunks(torch.ones(4), g)) == "non-finite gradients"


def test_guard_stop_raises_and_skip_counts_consecutive_steps() -> None:
    stop = NonFiniteGuard("stop", 5)
    assert stop.check(None, 1) is False
    with pytest.raises(FloatingPointError, match=r"step 2: non-finite LM loss.*on_nonfinite=skip"):
        stop.check("non-finite LM loss (nan)", 2)
    skip = NonFiniteGuard("skip", 2)
    assert skip.check("x", 1) is True
    assert skip.check("x", 2) is True
    assert skip.check(None, 3) is False  # a good step resets the run of skips
    assert skip.check("x", 4) is True
    assert skip.check("x", 5) is True
    with pytest.raises(FloatingPointError, match="max_consecutive_skips=2"):
        skip.check("x", 6)


def test_on_nonfinite_is_validated() -> None:
    from indexcache_train.config.compose import compose
    from indexcache_train.config.validate import ConfigError, check_recipe

    with pytest.raises(ConfigError, match=r"optim.on_nonfinite='ignore': use stop or skip"):
        check_recipe(compose(["+experiment=toy", "optim.on_nonfinite=ignore"]))
    with pytest.raises(ConfigError, match=r"optim.max_consecutive_skips=0"):
        check_recipe(compose(["+experiment=toy", "optim.max_consecutive_skips=0"]))


def _toy_sparse_step(poison: bool):
    """One sparse-stage step of the toy (MoE routers with expert bias) through ``train_step``;
    returns the metrics and the model's tensors before and after. ``poison``: the final norm's
    output turns NaN (a numerical blow-up late in the network: the routers below it have routed
    and Megatron's finalize updates their bias; the loss and every gradient are NaN)."""
    from indexcache_train.config.compose import compose
    from indexcache_train.config.validate import validate
    from indexcache_train.training.model_setup import build_chunks, wrap_stage
    from indexcache_train.training.observability import Throughput
    from indexcache_train.training.stages import position
    from indexcache_train.training.step import StepRunner
    from indexcache_train.training.update import train_step
    from tests.helpers.megatron_env import init_single_process

    init_single_process()
    cpu = torch.device("cpu")
    cfg = compose(["+experiment=toy", "optim.on_nonfinite=skip"])
    resolved = validate(cfg, 1)
    chunks, tcfg = build_chunks(cfg, resolved.model, None, cpu)
    pos = position(cfg, 4)
    assert pos.stage.trainable == "all"
    wrapped = wrap_stage(cfg, chunks, tcfg, pos.stage)
    runner = StepRunner(resolved.model.schedule, cfg.model.seq_length, 2, cpu)
    if poison:
        chunks[0].decoder.final_layernorm.register_forward_hook(
            lambda module, args, out: out * float("nan")
        )

    def tensors() -> dict[str, torch.Tensor]:
        sd = chunks[0].state_dict()
        return {k: v.detach().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}

    before = tensors()
    metrics = train_step(
        cfg,
        resolved,
        wrapped,
        runner,
        iter(_batches()),
        pos,
        4,
        Throughput(1, None),
        cpu,
        NonFiniteGuard("skip", 5),
    )
    return metrics, before, tensors()


def _batches() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):  # global batch 4 = 2 micro-batches of 2
        ids = torch.randint(0, 50257, (2, 129), generator=g)
        out.append(
            {
                "tokens": ids[:, :-1],
                "labels": ids[:, 1:],
                "loss_mask": torch.ones(2, 128),
                "position_ids": torch.arange(128).expand(2, -1),
            }
        )
    return out


def test_skipped_step_leaves_every_parameter_and_buffer_unchanged() -> None:
    # Megatron updates the routers' expert bias inside finalize_model_grads, before the guard
    # sees the gradients; a skipped step must undo that too.
    metrics, before, after = _toy_sparse_step(poison=True)
    assert metrics["optim/skipped"] == 1.0 and metrics["optim/update_ok"] == 0.0
    biases = [k for k in before if k.endswith("expert_bias")]
    assert len(biases) == 4  # MoE layers 1-3 and the MTP layer
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


def test_a_finite_step_moves_weights_and_expert_bias() -> None:
    # The control for the test above: the same step on clean data changes both.
    metrics, before, after = _toy_sparse_step(poison=False)
    assert metrics["optim/skipped"] == 0.0
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k for k in before if k.endswith("expert_bias")} <= changed
    assert any(k.endswith("linear_fc1.weight") for k in changed)
