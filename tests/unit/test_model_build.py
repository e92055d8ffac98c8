"""Model factory, state dict layout, training forward/backward and recompute-safe top-k reuse."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from indexcache_train.model.config import ModelConfig
from indexcache_train.model.forward_state import DistillSettings
from indexcache_train.model.hf_mapping import hf_tensor_names
from indexcache_train.model.toy_configs import glm5_toy_hf_config
from tests.helpers.megatron_env import init_single_process
from tests.helpers.models import CPU_PARALLEL, build_toy, state

B, S = 2, 24


@pytest.fixture(scope="module", autouse=True)
def _megatron() -> None:
    init_single_process()


def _indexer_layers(names) -> set[int]:
    out = set()
    for n in names:
        if ".indexer." in n:
            if n.startswith("mtp."):
                out.add(("mtp", int(n.split(".")[2])))
            else:
                out.add(int(n.split(".")[2]))
    return out


def test_indexer_tensors_exactly_on_full_layers_mtp_included() -> None:
    cfg, model = build_toy(
        glm5_toy_hf_config(num_hidden_layers=6, index_topk_freq=3, index_skip_topk_offset=1)
    )
    assert cfg.schedule.pattern == "FSSFSS" and cfg.schedule.mtp_indexer_types == ("full",)
    names = list(model.state_dict())
    assert _indexer_layers(names) == {0, 3, ("mtp", 0)}
    per_layer = [
        n for n in names if n.startswith("decoder.layers.0.self_attention.core_attention.indexer.")
    ]
    assert sorted(n.rsplit(".indexer.", 1)[1] for n in per_layer) == [
        "k_norm.bias",
        "k_norm.weight",
        "linear_weights_proj.weight",
        "linear_wk.weight",
        "linear_wq_b.weight",
    ]
    assert not any("layers.1.self_attention.core_attention" in n for n in names)
    hf = hf_tensor_names(cfg)
    assert {int(h.split(".")[2]) for h in hf if ".indexer." in h} == {
        0,
        3,
        6,
    }  # MTP = model.layers.6
    # Shared MTP layer: no indexer either (freq 2 / offset 2: global 4 is Shared).
    _cfg2, model2 = build_toy(
        glm5_toy_hf_config(num_hidden_layers=4, index_topk_freq=2, index_skip_topk_offset=2)
    )
    assert _indexer_layers(model2.state_dict()) == {0, 1, 3}


def test_indexer_weights_proj_is_fp32_in_bf16_model() -> None:
    par = dataclasses.replace(CPU_PARALLEL, params_dtype=torch.bfloat16, bf16=True)
    _, model = build_toy(glm5_toy_hf_config(num_hidden_layers=2), par)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert (
        dtypes["decoder.layers.0.self_attention.core_attention.indexer.linear_weights_proj.weight"]
        == torch.float32
    )
    assert dtypes["decoder.layers.0.self_attention.linear_q_down_proj.weight"] == torch.bfloat16
    assert model.decoder.layers[1].mlp.router.expert_bias.dtype == torch.float32


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("some_new_feature", 1, "not implemented"),
        ("attention_bias", True, "attention_bias=True unsupported"),
        ("norm_topk_prob", False, "norm_topk_prob"),
        ("hidden_act", "gelu", "hidden_act"),
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4}, "rope_type='llama3'"),
        ("model_type", "llama", "not a DSA model"),
    ],
)
def test_factory_rejects_unimplemented_config(field: str, value, match: str) -> None:
    hf = glm5_toy_hf_config()
    hf[field] = value
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_config(hf)


def test_grouped_routing_mismatch_is_refused() -> None:
    from indexcache_train.model.toy_configs import dsv32_toy_hf_config

    with pytest.raises(ValueError, match="topk_group == 2"):
        ModelConfig.from_hf_config(dsv32_toy_hf_config(num_experts_per_tok=4, topk_group=4))


def test_hf_config_round_trip() -> None:
    cfg = ModelConfig.from_hf_config(
        glm5_toy_hf_config(index_topk_freq=2, index_skip_topk_offset=1)
    )
    again = ModelConfig.from_hf_config(cfg.to_hf_config())
    assert again == cfg


def _ids(cfg: ModelConfig, seed: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_forward_backward_moe_mtp_shared(attention: str) -> None:
    cfg, model = build_toy(
        glm5_toy_hf_config(num_hidden_layers=4, index_topk_freq=2, index_skip_topk_offset=1)
    )
    assert cfg.num_mtp_layers == 1 and cfg.is_moe_layer(1) and not cfg.schedule.is_full(1)
    ids = _ids(cfg, 0)
    st = state(cfg, B, S, attention=attention, distill=DistillSettings(mode="multi"))
    loss = model(ids, torch.arange(S).expand(B, S), None, labels=ids.roll(-1, 1), dsa_state=st)
    assert loss.shape == (B, S) and torch.isfinite(loss).all()
    loss.mean().backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
    ]
    assert missing == []
    # Terms: every served layer (Shared ones too, mtp as global index 4).
    assert set(st.kl_terms) == {(0, 0), (0, 1), (2, 2), (2, 3), (4, 4)}
    assert st.live_entries() == []


def test_recompute_shared_layers_see_their_own_micro_batch_topk() -> None:
    """Forward A, forward B (different top-k), backward A with full recompute: A's Shared layers
    (one of them 2 layers from its source) must reuse A's forward-time indices."""
    from indexcache_train.model.factory import ParallelSettings

    hf = glm5_toy_hf_config(
        num_hidden_layers=5, indexer_types=["full", "shared", "shared", "full", "shared"]
    )
    rec = ParallelSettings(
        moe_token_dispatcher_type="allgather",
        recompute_granularity="full",
        recompute_method="uniform",
        recompute_num_layers=1,
    )
    torch.manual_seed(0)
    cfg, model = build_toy(hf, rec)
    torch.manual_seed(0)
    _, plain = build_toy(hf)
    plain.load_state_dict(model.state_dict())
    assert cfg.schedule.source(2) == 0
    pos = torch.arange(S).expand(B, S)
    ids_a, ids_b = _ids(cfg, 1), _ids(cfg, 2)
    distill = DistillSettings(mode="multi")

    # Reference: A alone, no recompute.
    st_ref = state(cfg, B, S, distill=distill, captured_topk={})
    plain(ids_a, pos, None, labels=ids_a, dsa_state=st_ref).mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in plain.named_parameters()}

    st_a = state(cfg, B, S, distill=distill, captured_topk={})
    st_b = state(cfg, B, S, distill=distill, captured_topk={})
    loss_a = model(ids_a, pos, None, labels=ids_a, dsa_state=st_a)
    topk_a = {k: v.clone() for k, v in st_a.captured_topk.items()}
    assert st_a.live_entries(), "recompute must keep the entries until backward"
    loss_b = model(ids_b, pos, None, labels=ids_b, dsa_state=st_b)
    assert not torch.equal(st_b.captured_topk[0], topk_a[0])  # B selects differently
    assert not torch.equal(topk_a[0], topk_a[3])  # Full layers differ from each other
    loss_a.mean().backward()
    for layer, idx in st_a.captured_topk.items():  # recompute overwrote these: same as forward
        assert torch.equal(idx, topk_a[layer]), layer
    assert st_a.live_entries() == []  # the last recompute read dropped every entry
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)
    loss_b.mean().backward()
    assert st_b.live_entries() == []


def test_no_recompute_drops_entries_after_last_consumer() -> None:
    cfg, model = build_toy(
        glm5_toy_hf_config(num_hidden_layers=4, index_topk_freq=4, index_skip_topk_offset=1)
    )
    st = state(cfg, B, S)
    ids = _ids(cfg, 0)
    with torch.no_grad():
        model(ids, torch.arange(S).expand(B, S), None, dsa_state=st)
    assert st.live_entries() == []


def test_state_peak_is_one_entry_of_own_rows() -> None:
    """FSFS: layer 0's entry lives until layer 1 read it, layer 2's until layer 3 (the MTP Full
    layer serves no one): the peak is one entry, the top-k and the indexer inputs of the rows."""
    from indexcache_train.model.forward_state import take_state_peak_bytes

    cfg, model = build_toy(
        glm5_toy_hf_config(num_hidden_layers=4, index_topk_freq=2, index_skip_topk_offset=1)
    )
    st = state(cfg, B, S, distill=DistillSettings(mode="multi", compute_grad=False))
    take_state_peak_bytes()
    with torch.no_grad():
        model(_ids(cfg, 0), torch.arange(S).expand(B, S), None, dsa_state=st)
    topk = B * S * min(cfg.index_topk, S) * 4  # int32
    inputs = B * S * (cfg.hidden_size + cfg.q_lora_rank) * 4  # fp32 hidden rows and q latent
    assert take_state_peak_bytes() == topk + inputs
    assert take_state_peak_bytes() == 0  # nothing live: the next period starts empty


def test_dist_checkpoint_round_trip(tmp_path) -> None:
    from megatron.core import dist_checkpointing

    _, model = build_toy(
        glm5_toy_hf_config(num_hidden_layers=3, index_topk_freq=2, index_skip_topk_offset=1)
    )
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    torch.manual_seed(123)
    _, fresh = build_toy(
        glm5_toy_hf_config(num_hidden_layers=3, index_topk_freq=2, index_skip_topk_offset=1)
    )
    assert any(
        not torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values())
        if isinstance(a, torch.Tensor)
    )
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path)))
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), n
