"""Training-step guards: MoE load-balance metrics from router counts, and the non-finite guard
(``optim.on_nonfinite``: stop before the update, or skip it, with a limit on skips in a row)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from indexcache_train.training.loop import _nonfinite_reason, _NonFiniteGuard
from indexcache_train.training.moe_metrics import ExpertLoadTracker, load_balance_metrics

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


def _wrapped(*grads: torch.Tensor):
    chunk = SimpleNamespace(
        buffers=[SimpleNamespace(grad_data=g) for g in grads], expert_parallel_buffers=[]
    )
    return SimpleNamespace(ddp_chunks=[chunk])


def _result(lm: float = 2.0, kl: dict | None = None):
    return SimpleNamespace(lm_loss=lm, kl=kl if kl is not None else {(0, 0): 0.5, (0, 1): 0.7})


def test_nonfinite_reason_names_what_went_wrong() -> None:
    cpu = torch.device("cpu")
    ok = _wrapped(torch.ones(8))
    assert _nonfinite_reason(_result(), ok, False, cpu) is None
    assert "LM loss" in _nonfinite_reason(_result(lm=float("nan")), ok, False, cpu)
    # A frozen trunk (warm-up) computes no LM gradient: its LM loss is not what trains.
    assert _nonfinite_reason(_result(lm=float("nan")), ok, True, cpu) is None
    r = _nonfinite_reason(_result(kl={(0, 0): 0.5, (0, 2): float("inf")}), ok, True, cpu)
    assert "(0, 2)" in r
    g = torch.ones(8)
    g[3] = float("nan")
    assert _nonfinite_reason(_result(), _wrapped(torch.ones(4), g), False, cpu) == (
        "non-finite gradients"
    )


def test_guard_stop_raises_and_skip_counts_consecutive_steps() -> None:
    stop = _NonFiniteGuard("stop", 5)
    assert stop.check(None, 1) is False
    with pytest.raises(FloatingPointError, match=r"step 2: non-finite LM loss.*on_nonfinite=skip"):
        stop.check("non-finite LM loss (nan)", 2)
    skip = _NonFiniteGuard("skip", 2)
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
