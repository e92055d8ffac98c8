"""Parity with transformers 5.17 (fp32 toys): logits and per-layer top-k sets.

Thresholds (the parity ladder, L2): max |logits diff| <= 1e-5 and identical top-k *sets* (among
valid causal keys) in every layer. HF scatters its top-k into a mask, so for rows with fewer
than ``index_topk`` earlier keys its extra slots point at masked (future) keys; ours are -1.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV32ForCausalLM, GlmMoeDsaForCausalLM

from indexcache_train.model.config import ModelConfig
from indexcache_train.model.families import DSV32_YARN
from indexcache_train.model.hf_mapping import load_hf_state_dict
from indexcache_train.model.toy_configs import dsv32_toy_hf_config, glm5_toy_hf_config
from tests.helpers.megatron_env import init_single_process
from tests.helpers.models import build_toy, hf_file_state_dict, perturbed_hf_model, state

B, S = 2, 24


@pytest.fixture(scope="module", autouse=True)
def _megatron() -> None:
    init_single_process()


def _topk_sets(idx: torch.Tensor, causal: bool) -> list[list[set[int]]]:
    out = []
    for b in range(idx.shape[0]):
        out.append(
            [
                {t for t in row if t >= 0 and (not causal or t <= s)}
                for s, row in enumerate(idx[b].tolist())
            ]
        )
    return out


def _capture_hf_topk(hf_model) -> dict[int, torch.Tensor]:
    caps: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(hf_model.model.layers):
        # GLM's attention returns the top-k it used (own or reused); DeepSeek's returns 2 values,
        # and every DeepSeek layer has an indexer whose output is that top-k.
        if hasattr(layer.self_attn, "skip_topk"):
            layer.self_attn.register_forward_hook(
                lambda mod, args, out, i=i: caps.__setitem__(i, out[2])
            )
        else:
            layer.self_attn.indexer.register_forward_hook(
                lambda mod, args, out, i=i: caps.__setitem__(i, out)
            )
    return caps


def _ours_vs_hf(hf_cls, hf_config: dict, attention: str = "sparse"):
    hf = perturbed_hf_model(hf_cls, hf_config)
    caps = _capture_hf_topk(hf)
    cfg, model = build_toy({**hf.config.to_dict(), "num_nextn_predict_layers": 0})
    model.eval()
    load_hf_state_dict(model, cfg, hf_file_state_dict(hf))
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        st = state(cfg, B, S, attention=attention, captured_topk={})
        ours = model(ids, torch.arange(S).expand(B, S), None, dsa_state=st)
    return cfg, ref, ours, caps, st.captured_topk


def test_glm5_with_shared_layers_matches_transformers() -> None:
    hf_cfg = glm5_toy_hf_config(
        num_hidden_layers=6, indexer_types=["full", "shared", "shared", "full", "shared", "full"]
    )
    cfg, ref, ours, hf_topk, our_topk = _ours_vs_hf(GlmMoeDsaForCausalLM, hf_cfg)
    assert cfg.index_topk < S and not cfg.schedule.is_full(2) and cfg.schedule.source(2) == 0
    assert (ours - ref).abs().max().item() <= 1e-5
    for layer in range(cfg.num_layers):
        assert _topk_sets(our_topk[layer], False) == _topk_sets(hf_topk[layer], True), layer
    # Selection matters: later rows keep index_topk of their > index_topk causal keys.
    assert all(
        len(s) == cfg.index_topk for s in _topk_sets(our_topk[0], False)[0][cfg.index_topk :]
    )


def test_glm5_freq_offset_schedule_matches_transformers() -> None:
    hf_cfg = glm5_toy_hf_config(num_hidden_layers=7, index_topk_freq=3, index_skip_topk_offset=2)
    cfg, ref, ours, hf_topk, our_topk = _ours_vs_hf(GlmMoeDsaForCausalLM, hf_cfg)
    assert cfg.schedule.pattern == "FFSSFSS"
    assert (ours - ref).abs().max().item() <= 1e-5
    for layer in range(cfg.num_layers):
        assert _topk_sets(our_topk[layer], False) == _topk_sets(hf_topk[layer], True), layer


def test_deepseek_v32_all_full_yarn_grouped_routing_matches_transformers() -> None:
    hf_cfg = dsv32_toy_hf_config(
        num_hidden_layers=3, rope_parameters=dict(DSV32_YARN), max_position_embeddings=163840
    )
    cfg, ref, ours, hf_topk, our_topk = _ours_vs_hf(DeepseekV32ForCausalLM, hf_cfg)
    assert cfg.n_group == 8 and cfg.topk_group == 4 and not cfg.indexer_rope_interleave
    assert cfg.rope.rope_type == "yarn" and cfg.softmax_scale() != cfg.qk_head_dim**-0.5
    assert (ours - ref).abs().max().item() <= 1e-5
    for layer in range(cfg.num_layers):
        assert _topk_sets(our_topk[layer], False) == _topk_sets(hf_topk[layer], True), layer


def test_dense_expanded_form_equals_sparse_absorbed_form_with_all_keys() -> None:
    """The warm-up (expanded MLA, dense) and sparse-stage (absorbed MLA) forms are the same math."""
    hf_cfg = glm5_toy_hf_config(
        num_hidden_layers=3, index_topk=64, index_topk_freq=2, index_skip_topk_offset=1
    )
    cfg, model = build_toy(hf_cfg)
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    pos = torch.arange(S).expand(B, S)
    with torch.no_grad():
        sparse = model(ids, pos, None, dsa_state=state(cfg, B, S, attention="sparse"))
        dense = model(ids, pos, None, dsa_state=state(cfg, B, S, attention="dense"))
    assert (sparse - dense).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mtp_shared", [False, True])
def test_mtp_matches_reference_formula(mtp_shared: bool) -> None:
    """MTP depth 0 against ``shared_head.norm(HF_layer_N(eh_proj([enorm(emb(t+1)); hnorm(h)])))``,
    where HF_layer_N is transformers' own decoder layer loaded with our MTP layer's weights."""
    from indexcache_train.model.hf_mapping import export_hf_state_dict

    n = 4
    # freq 2 / offset 2 on 4 layers: trunk FFSF; MTP (global 4): max(3, 0) % 2 = 1 -> Shared, source 3.
    sched = dict(index_topk_freq=2, index_skip_topk_offset=2) if mtp_shared else {}
    cfg, model = build_toy(glm5_toy_hf_config(num_hidden_layers=n, num_mtp_layers=1, **sched))
    assert cfg.schedule.is_full(n) != mtp_shared
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    # HF twin with N+1 layers: layer N plays the MTP inner layer (HF drops enorm/hnorm/eh_proj).
    hf_dict = {**cfg.to_hf_config(), "num_hidden_layers": n + 1}
    types = list(cfg.schedule.indexer_types) + list(cfg.schedule.mtp_indexer_types)
    hf_dict["indexer_types"] = types
    for k in (
        "index_topk_freq",
        "index_skip_topk_offset",
        "index_topk_pattern",
        "mlp_layer_types",
        "num_nextn_predict_layers",
    ):
        hf_dict.pop(k, None)
    hf = GlmMoeDsaForCausalLM(GlmMoeDsaForCausalLM.config_class(**hf_dict)).eval()
    hf.config._attn_implementation = "eager"
    ours_sd = export_hf_state_dict(model, cfg)
    missing, _unexpected = hf.load_state_dict(_fuse_experts(ours_sd, cfg), strict=False)
    assert not [m for m in missing if "rotary" not in m]

    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(S).expand(B, S)
    st = state(cfg, B, S)
    with torch.no_grad():
        emb = model.embedding(input_ids=ids, position_ids=pos)
        h = model.decoder(emb, None, dsa_state=st)
        ours = model.mtp(ids, pos, h, None, dsa_state=st, embedding=model.embedding)[
            S:
        ]  # depth-0 chunk

        out = hf.model(ids, output_hidden_states=True)
        h_ref = hf.model.norm(
            out.hidden_states[n]
        )  # trunk output after the final norm (Megatron's MTP input)
        assert (h.transpose(0, 1) - h_ref).abs().max().item() <= 1e-5
        nxt = torch.cat(
            [ids[:, 1:], torch.zeros_like(ids[:, :1])], 1
        )  # Megatron's roll: zero-filled
        e = hf.model.embed_tokens(nxt)
        w = {k: v for k, v in ours_sd.items() if k.startswith(f"model.layers.{n}.")}
        x = torch.cat(
            [
                _rms(e, w[f"model.layers.{n}.enorm.weight"], cfg),
                _rms(h_ref, w[f"model.layers.{n}.hnorm.weight"], cfg),
            ],
            -1,
        )
        x = x @ w[f"model.layers.{n}.eh_proj.weight"].T
        cos_sin = hf.model.rotary_emb(x, position_ids=pos)
        mask = torch.full((S, S), float("-inf")).triu(1)[None, None].expand(B, 1, S, S)
        prev = None
        if mtp_shared:  # the HF layer reuses the trunk source layer's top-k, as our MTP layer does
            caps = {}
            hook = hf.model.layers[cfg.schedule.source(n)].self_attn.register_forward_hook(
                lambda mod, a, o: caps.__setitem__("t", o[2])
            )
            hf.model(ids)
            hook.remove()
            prev = caps["t"]
        y, _ = hf.model.layers[n](
            x,
            attention_mask=mask,
            position_embeddings=cos_sin,
            position_ids=pos,
            prev_topk_indices=prev,
        )
        ref = _rms(y, w[f"model.layers.{n}.shared_head.norm.weight"], cfg)
    assert (ours.transpose(0, 1) - ref).abs().max().item() <= 1e-5


def _rms(x: torch.Tensor, w: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))


def _fuse_experts(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Per-expert file tensors -> transformers' in-memory fused expert parameters."""
    out = {k: v for k, v in sd.items() if ".mlp.experts." not in k}
    layers = {k.split(".mlp.experts.")[0] for k in sd if ".mlp.experts." in k}
    for prefix in layers:
        e = range(cfg.n_routed_experts)
        gate_up = [
            torch.cat(
                [
                    sd[f"{prefix}.mlp.experts.{i}.gate_proj.weight"],
                    sd[f"{prefix}.mlp.experts.{i}.up_proj.weight"],
                ]
            )
            for i in e
        ]
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        out[f"{prefix}.mlp.experts.down_proj"] = torch.stack(
            [sd[f"{prefix}.mlp.experts.{i}.down_proj.weight"] for i in e]
        )
    return out
