"""convert-schedule on tiny transformers 5.17 checkpoints: names, bits, dtypes, configs, loading, errors."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_tools.convert_schedule import (
    SCHEDULE_KEYS,
    IndexerDims,
    ScheduleRequest,
    convert_schedule,
    plan_conversion,
)
from checkpoint_tools.errors import (
    CheckpointError,
    ConfigError,
    ConfigScheduleMismatchError,
    CorruptShardError,
    DtypeMismatchError,
    MissingTensorError,
    OutputExistsError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnsupportedConversionError,
)
from checkpoint_tools.hf_io import HFCheckpoint, ShardedCheckpointWriter
from checkpoint_tools.inspect_checkpoint import describe
from checkpoint_tools.validation import validate_hf_checkpoint
from indexcache_train.model.families import FAMILIES
from indexcache_train.schedule import IndexCacheSchedule
from tests.helpers.hf_toys import (
    make_dense_mla_toy_config,
    make_dsv32_toy_config,
    make_glm5_toy_config,
    read_all,
    save_toy_checkpoint,
)

N = 6  # trunk layers; MTP layer = model.layers.6. freq 4 / offset 3 -> FFFSSS + MTP F (GLM-5.2 shape)
INDEXER = re.compile(r"model\.layers\.(\d+)\.self_attn\.indexer\.")


@pytest.fixture(scope="module")
def toys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toys")
    return {
        "glm5": save_toy_checkpoint(make_glm5_toy_config(num_hidden_layers=N), root / "glm5"),
        "glm5_fused": save_toy_checkpoint(
            make_glm5_toy_config(num_hidden_layers=N), root / "glm5_fused", fused_experts=True
        ),
        "glm5_4": save_toy_checkpoint(make_glm5_toy_config(), root / "glm5_4", with_mtp=True),
        "glm5_nomtp": save_toy_checkpoint(
            make_glm5_toy_config(num_hidden_layers=N), root / "nomtp", with_mtp=False
        ),
        "dsv32": save_toy_checkpoint(make_dsv32_toy_config(num_hidden_layers=N), root / "dsv32"),
        "glm4_moe_lite": save_toy_checkpoint(
            make_dense_mla_toy_config("glm4_moe_lite"), root / "lite"
        ),
        "deepseek_v3": save_toy_checkpoint(make_dense_mla_toy_config("deepseek_v3"), root / "dsv3"),
    }


# ---------------------------------------------------------------------- helpers
def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def indexer_layers(names: Any) -> set[int]:
    return {int(m.group(1)) for n in names if (m := INDEXER.match(n))}


def load_hf(directory: Path, cls_name: str) -> tuple[Any, dict[str, Any]]:
    import transformers

    return getattr(transformers, cls_name).from_pretrained(directory, output_loading_info=True)


def assert_loads_cleanly(directory: Path, cls_name: str, num_layers: int) -> Any:
    """No missing keys; the only unexpected ones are the MTP layer's, which transformers does not
    model (its ignore regex is hard-coded to the full model's ``model.layers.78`` / ``61``)."""
    model, info = load_hf(directory, cls_name)
    assert not info["missing_keys"]
    assert not info["mismatched_keys"]
    assert all(k.startswith(f"model.layers.{num_layers}.") for k in info["unexpected_keys"])
    return model


def expected_config(src: Path, schedule: IndexCacheSchedule, **extra: Any) -> dict[str, Any]:
    config = json.loads((src / "config.json").read_text())
    out = {k: v for k, v in config.items() if k not in SCHEDULE_KEYS}
    out.update(schedule.to_hf_config())
    out.setdefault("rope_interleave", True)
    out.update(extra)
    return out


def assert_refused(
    call: Callable[[], Any], error: type[CheckpointError], match: str, out: Path
) -> None:
    with pytest.raises(error, match=match):
        call()
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def edited_copy(
    src: Path, dst: Path, config: dict[str, Any] | None = None, shard_edit: Callable | None = None
) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        current = json.loads((dst / "config.json").read_text())
        current.update(config)
        (dst / "config.json").write_text(json.dumps(current))
    if shard_edit is not None:
        shard = dst / "model-00001-of-00002.safetensors"
        tensors = shard_edit(load_file(shard))
        save_file(tensors, shard, metadata={"format": "pt"})
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        mtp = {k: v for k, v in index["weight_map"].items() if v != shard.name}
        index["weight_map"] = {**mtp, **dict.fromkeys(tensors, shard.name)}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


# ---------------------------------------------------------------------- transformers facts
def test_save_pretrained_writes_per_expert_names_and_both_forms_load(toys: dict[str, Path]) -> None:
    names = HFCheckpoint(toys["glm5"]).names
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in names
    assert not any(n.endswith("experts.gate_up_proj") for n in names)
    fused = HFCheckpoint(toys["glm5_fused"]).names
    assert "model.layers.1.mlp.experts.gate_up_proj" in fused
    per_expert_model = assert_loads_cleanly(toys["glm5"], "GlmMoeDsaForCausalLM", N)
    fused_model = assert_loads_cleanly(toys["glm5_fused"], "GlmMoeDsaForCausalLM", N)
    assert torch.equal(
        per_expert_model.model.layers[1].mlp.experts.gate_up_proj,
        fused_model.model.layers[1].mlp.experts.gate_up_proj,
    )
    report = validate_hf_checkpoint(toys["glm5_fused"])
    assert report.ok and set(report.expert_formats.values()) == {"fused"}


# ---------------------------------------------------------------------- GLM-5 round trip
@pytest.fixture(scope="module")
def glm_round_trip(
    toys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("glm_rt")
    to_shared = convert_schedule(
        toys["glm5"], root / "freq4", ScheduleRequest(4, 3), shard_size="40KB"
    )
    back = convert_schedule(root / "freq4", root / "full", ScheduleRequest(1))
    return {"root": root, "to_shared": to_shared, "back": back}


def test_all_full_to_freq4_offset3(toys: dict[str, Path], glm_round_trip: dict[str, Any]) -> None:
    out = glm_round_trip["root"] / "freq4"
    before, after = read_all(toys["glm5"]), read_all(out)
    schedule = IndexCacheSchedule.from_freq_offset(N, 4, 3, 1)
    assert schedule.pattern == "FFFSSS" and schedule.is_full(N)
    # Names: exactly the input minus the indexers of the layers that became Shared.
    assert set(after) == {
        n for n in before if not (m := INDEXER.match(n)) or int(m.group(1)) not in (3, 4, 5)
    }
    assert indexer_layers(after) == {0, 1, 2, 6}
    assert all(same_bits(after[n], before[n]) for n in after)  # bit-identical, dtype kept
    assert after["model.layers.0.self_attn.indexer.weights_proj.weight"].dtype == torch.float32
    assert after["model.layers.2.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert after["model.layers.2.self_attn.q_b_proj.weight"].dtype == torch.bfloat16
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2  # honoured --shard-size
    config = json.loads((out / "config.json").read_text())
    assert config == expected_config(toys["glm5"], schedule, indexer_rope_interleave=True)
    assert {k: config[k] for k in SCHEDULE_KEYS} == {
        k: v for k, v in schedule.to_hf_config().items() if k in SCHEDULE_KEYS
    }
    model = assert_loads_cleanly(out, "GlmMoeDsaForCausalLM", N)
    assert model.config.indexer_types == list(schedule.indexer_types)
    assert [layer.self_attn.indexer is None for layer in model.model.layers] == [False] * 3 + [
        True
    ] * 3
    assert torch.equal(
        model.model.layers[2].self_attn.indexer.wq_b.weight,
        after["model.layers.2.self_attn.indexer.wq_b.weight"],
    )
    assert glm_round_trip["to_shared"].dropped and validate_hf_checkpoint(out).ok


def test_back_to_all_full_copies_from_source(
    toys: dict[str, Path], glm_round_trip: dict[str, Any]
) -> None:
    out = glm_round_trip["root"] / "full"
    before, after = read_all(toys["glm5"]), read_all(out)
    assert glm_round_trip["back"].indexer_from == {0: 0, 1: 1, 2: 2, 3: 2, 4: 2, 5: 2, 6: 6}
    assert set(after) == set(before)
    for name, tensor in after.items():
        m = INDEXER.match(name)
        source = (
            name.replace(f"layers.{m.group(1)}.", "layers.2.", 1)
            if m and int(m.group(1)) in (3, 4, 5)
            else name
        )
        assert same_bits(tensor, before[source]), name
    model = assert_loads_cleanly(out, "GlmMoeDsaForCausalLM", N)
    assert model.config.indexer_types == ["full"] * N
    config = json.loads((out / "config.json").read_text())
    assert config["index_topk_freq"] == 1 and config["index_topk_pattern"] is None


def test_random_init_follows_transformers_conventions(
    glm_round_trip: dict[str, Any], tmp_path: Path
) -> None:
    src = glm_round_trip["root"] / "freq4"
    plan = convert_schedule(
        src, tmp_path / "r0", ScheduleRequest(1), init_missing_indexers="random", seed=0
    )
    assert plan.initialised == [3, 4, 5] and plan.indexer_from == {0: 0, 1: 1, 2: 2, 6: 6}
    out = read_all(tmp_path / "r0")
    p = "model.layers.4.self_attn.indexer."
    assert torch.equal(out[p + "k_norm.weight"], torch.ones(16, dtype=torch.bfloat16))
    assert torch.equal(out[p + "k_norm.bias"], torch.zeros(16, dtype=torch.bfloat16))
    assert out[p + "weights_proj.weight"].dtype == torch.float32
    assert out[p + "wq_b.weight"].dtype == torch.bfloat16  # template: the existing indexers' dtype
    std = out[p + "wq_b.weight"].float().std().item()
    assert 0.015 < std < 0.025  # initializer_range 0.02, 1024 samples
    assert abs(out[p + "wk.weight"].float().mean().item()) < 0.005
    convert_schedule(
        src, tmp_path / "r0b", ScheduleRequest(1), init_missing_indexers="random", seed=0
    )
    convert_schedule(
        src, tmp_path / "r1", ScheduleRequest(1), init_missing_indexers="random", seed=1
    )
    again, other = read_all(tmp_path / "r0b"), read_all(tmp_path / "r1")
    assert same_bits(again[p + "wq_b.weight"], out[p + "wq_b.weight"])
    assert not torch.equal(other[p + "wq_b.weight"], out[p + "wq_b.weight"])
    assert not torch.equal(
        out[p + "wq_b.weight"], out["model.layers.3.self_attn.indexer.wq_b.weight"]
    )
    assert_loads_cleanly(tmp_path / "r0", "GlmMoeDsaForCausalLM", N)


def test_custom_pattern(toys: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pattern"
    plan = convert_schedule(toys["glm5"], out, ScheduleRequest(pattern="FSFFSS"))
    assert plan.schedule_out.pattern == "FSFFSS"
    after = read_all(out)
    assert indexer_layers(after) == {0, 2, 3, 6}
    config = json.loads((out / "config.json").read_text())
    assert config["index_topk_pattern"] == "FSFFSS" and config["index_topk_freq"] == 1
    assert config["indexer_types"] == ["full", "shared", "full", "full", "shared", "shared"]
    model = assert_loads_cleanly(out, "GlmMoeDsaForCausalLM", N)
    assert model.config.indexer_types == config["indexer_types"]
    # Pattern -> other pattern: layer 1 regains an indexer from its source 0, layer 3 loses its own.
    plan = convert_schedule(out, tmp_path / "pattern2", ScheduleRequest(pattern="FFFSFS"))
    assert plan.indexer_from == {0: 0, 1: 0, 2: 2, 4: 3, 6: 6}


def test_carried_config_keys(toys: dict[str, Path], tmp_path: Path) -> None:
    carried = {
        "index_share_for_mtp_iteration": True,
        "indexer_rope_interleave": False,
        "rope_interleave": True,
    }
    src = edited_copy(toys["glm5"], tmp_path / "src", config=carried)
    plan = convert_schedule(src, tmp_path / "out", ScheduleRequest(4, 3))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: config[k] for k in carried} == carried  # present values are never overridden
    assert plan.schedule_out.index_share_for_mtp_iteration


def test_fused_experts_stay_fused(toys: dict[str, Path], tmp_path: Path) -> None:
    convert_schedule(toys["glm5_fused"], tmp_path / "fused", ScheduleRequest(4, 3))
    names = HFCheckpoint(tmp_path / "fused").names
    assert "model.layers.1.mlp.experts.gate_up_proj" in names
    assert not any(re.search(r"experts\.\d+\.", n) for n in names)
    assert_loads_cleanly(tmp_path / "fused", "GlmMoeDsaForCausalLM", N)


def test_no_mtp_checkpoint_loads_with_no_unexpected_keys(
    toys: dict[str, Path], tmp_path: Path
) -> None:
    convert_schedule(toys["glm5_nomtp"], tmp_path / "nomtp", ScheduleRequest(2, 2))
    model, info = load_hf(tmp_path / "nomtp", "GlmMoeDsaForCausalLM")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.indexer_types == ["full", "full", "shared", "full", "shared", "full"]


def test_mtp_role_follows_what_the_config_can_express(
    toys: dict[str, Path], tmp_path: Path
) -> None:
    """The MTP layer's tensors follow the schedule the written config reads back as."""
    # 4 layers, freq 4 / offset 3: the rule makes the MTP layer (global index 4) Shared, and
    # config.json carries freq/offset, so every reader sees it Shared: its indexer goes.
    plan = convert_schedule(toys["glm5_4"], tmp_path / "rule", ScheduleRequest(4, 3))
    assert plan.schedule_out.mtp_indexer_types == ("shared",) and not plan.notes
    assert indexer_layers(HFCheckpoint(tmp_path / "rule").names) == {0, 1, 2}
    assert validate_hf_checkpoint(tmp_path / "rule").ok
    # A non-periodic pattern with an MTP character: config.json has no key for MTP roles
    # (indexer_types / index_topk_pattern cover the trunk), so it reads back Full and keeps its
    # indexer; the plan says so instead of writing a checkpoint no reader agrees with.
    requested = IndexCacheSchedule.from_pattern("FSFFS", 4, 1)
    assert requested.mtp_indexer_types == ("shared",) and not requested.is_periodic
    plan = convert_schedule(toys["glm5_4"], tmp_path / "pattern", ScheduleRequest(pattern="FSFFS"))
    assert plan.schedule_out.mtp_indexer_types == ("full",)
    assert any("MTP roles" in note for note in plan.notes)
    assert indexer_layers(HFCheckpoint(tmp_path / "pattern").names) == {0, 2, 3, 4}
    assert validate_hf_checkpoint(tmp_path / "pattern").ok


# ---------------------------------------------------------------------- DeepSeek-V3.2
def test_dsv32_shared_schedule_refused_by_default(toys: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "dsv32_shared"
    assert_refused(
        lambda: convert_schedule(toys["dsv32"], out, ScheduleRequest(4, 3)),
        UnsupportedConversionError,
        "deepseek_v32 cannot hold Shared layers",
        out,
    )
    convert_schedule(toys["dsv32"], tmp_path / "dsv32_full", ScheduleRequest(1))  # all-Full is fine
    assert_loads_cleanly(tmp_path / "dsv32_full", "DeepseekV32ForCausalLM", N)
    config = json.loads((tmp_path / "dsv32_full" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v32" and config["indexer_rope_interleave"] is False


def test_dsv32_shared_schedule_when_allowed(toys: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "dsv32_shared"
    plan = convert_schedule(
        toys["dsv32"], out, ScheduleRequest(4, 3), allow_transformers_incompatible=True
    )
    assert any("cannot load" in note for note in plan.notes)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v32"  # never relabelled: the indexer RoPE differs
    assert config["indexer_types"] == ["full"] * 3 + ["shared"] * 3
    assert indexer_layers(HFCheckpoint(out).names) == {0, 1, 2, 6}
    _, info = load_hf(out, "DeepseekV32ForCausalLM")  # the documented limitation, observed
    assert {k for k in info["missing_keys"] if ".indexer." in k} and all(
        re.match(r"model\.layers\.[345]\.self_attn\.indexer\.", k) for k in info["missing_keys"]
    )
    convert_schedule(out, tmp_path / "dsv32_back", ScheduleRequest(1))
    before, after = read_all(toys["dsv32"]), read_all(tmp_path / "dsv32_back")
    assert set(before) == set(after)
    assert all(
        same_bits(after[n], before[n])
        for n in after
        if not re.match(r"model\.layers\.[345]\.self_attn\.indexer", n)
    )


# ---------------------------------------------------------------------- dense MLA parents
@pytest.mark.parametrize(
    ("parent", "target_cls"),
    [("glm4_moe_lite", "GlmMoeDsaForCausalLM"), ("deepseek_v3", "DeepseekV32ForCausalLM")],
)
def test_dense_mla_gets_fresh_indexers(
    toys: dict[str, Path], tmp_path: Path, parent: str, target_cls: str
) -> None:
    src = toys[parent]
    target = FAMILIES[parent].dsa_model_type
    out = tmp_path / "warmup"
    plan = convert_schedule(src, out, ScheduleRequest(1), index_dims=IndexerDims(4, 16, 2))
    assert plan.initialised == [0, 1, 2, 3, 4]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == target and config["architectures"] == [target_cls]
    assert (config["index_topk"], config["index_head_dim"], config["index_n_heads"]) == (4, 16, 2)
    assert (
        config["mlp_layer_types"] == ["dense"] + ["sparse"] * 3
        and config["first_k_dense_replace"] == 1
    )
    assert config["indexer_rope_interleave"] is FAMILIES[target].indexer_rope_interleave
    before, after = read_all(src), read_all(out)
    assert set(after) - set(before) == {n for n in after if INDEXER.match(n)}
    assert all(same_bits(after[n], before[n]) for n in before)
    model = assert_loads_cleanly(out, target_cls, 4)
    assert model.config.index_n_heads == 2
    if target == "glm_moe_dsa":  # a Shared schedule is only representable in GLM
        convert_schedule(
            src,
            tmp_path / "shared",
            ScheduleRequest(pattern="FFSF"),
            index_dims=IndexerDims(4, 16, 2),
        )
        assert indexer_layers(HFCheckpoint(tmp_path / "shared").names) == {0, 1, 3, 4}
        assert_loads_cleanly(tmp_path / "shared", target_cls, 4)


def test_dense_mla_defaults_and_refusals(toys: dict[str, Path], tmp_path: Path) -> None:
    convert_schedule(toys["glm4_moe_lite"], tmp_path / "defaults", ScheduleRequest(1))
    config = json.loads((tmp_path / "defaults" / "config.json").read_text())
    assert (config["index_topk"], config["index_head_dim"], config["index_n_heads"]) == (
        2048,
        128,
        32,
    )
    out = tmp_path / "nosource"
    assert_refused(
        lambda: convert_schedule(
            toys["glm4_moe_lite"], out, ScheduleRequest(1), init_missing_indexers="from-source"
        ),
        UnsupportedConversionError,
        "no indexers to copy",
        out,
    )
    assert_refused(
        lambda: convert_schedule(
            toys["glm5"], out, ScheduleRequest(1), index_dims=IndexerDims(8, 16, 2)
        ),
        UnsupportedConversionError,
        "indexer sizes come from the input config",
        out,
    )


# ---------------------------------------------------------------------- bad inputs
def test_missing_tensor(toys: dict[str, Path], tmp_path: Path) -> None:
    name = "model.layers.2.self_attn.q_a_proj.weight"
    bad = edited_copy(
        toys["glm5"],
        tmp_path / "bad",
        shard_edit=lambda t: {k: v for k, v in t.items() if k != name},
    )
    out = tmp_path / "out"
    assert_refused(
        lambda: convert_schedule(bad, out, ScheduleRequest(4, 3)),
        MissingTensorError,
        re.escape(name),
        out,
    )


def test_indexer_on_shared_layer(toys: dict[str, Path], tmp_path: Path) -> None:
    schedule = IndexCacheSchedule.from_freq_offset(N, 4, 3, 1)
    bad = edited_copy(
        toys["glm5"], tmp_path / "bad", config=schedule.to_hf_config()
    )  # still has all indexers
    out = tmp_path / "out"
    assert_refused(
        lambda: convert_schedule(bad, out, ScheduleRequest(1)),
        UnexpectedTensorError,
        "--drop-shared-indexers",
        out,
    )
    plan = convert_schedule(bad, out, ScheduleRequest(2, 2), drop_shared_indexers=True)
    # Dropped, never reused: layer 3 (Shared in the input config) gets layer 2's indexer.
    assert plan.indexer_from[3] == 2
    assert same_bits(
        read_all(out)["model.layers.3.self_attn.indexer.wk.weight"],
        read_all(bad)["model.layers.2.self_attn.indexer.wk.weight"],
    )


def test_unknown_tensor_and_layer_beyond_mtp(toys: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    extra = edited_copy(
        toys["glm5"],
        tmp_path / "extra",
        shard_edit=lambda t: {**t, "model.layers.1.mystery.weight": torch.zeros(2)},
    )
    assert_refused(
        lambda: convert_schedule(extra, out, ScheduleRequest(1)),
        UnexpectedTensorError,
        "mystery",
        out,
    )
    no_mtp_key = edited_copy(
        toys["glm5"], tmp_path / "nomtpkey", config={"num_nextn_predict_layers": 0}
    )
    assert_refused(
        lambda: convert_schedule(no_mtp_key, out, ScheduleRequest(1)),
        UnexpectedTensorError,
        "num_nextn_predict_layers",
        out,
    )


def test_shape_and_dtype_mismatch(toys: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    wrong_size = edited_copy(toys["glm5"], tmp_path / "shape", config={"index_head_dim": 32})
    assert_refused(
        lambda: convert_schedule(wrong_size, out, ScheduleRequest(1)),
        ShapeMismatchError,
        "indexer.wk.weight",
        out,
    )
    wrong_dtype = edited_copy(toys["glm5"], tmp_path / "dtype", config={"dtype": "float16"})
    assert_refused(
        lambda: convert_schedule(wrong_dtype, out, ScheduleRequest(1)),
        DtypeMismatchError,
        "config.json says F16",
        out,
    )
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    bf16_bias = edited_copy(
        toys["glm5"], tmp_path / "bias", shard_edit=lambda t: {**t, bias: t[bias].bfloat16()}
    )
    assert_refused(
        lambda: convert_schedule(bf16_bias, out, ScheduleRequest(1)),
        DtypeMismatchError,
        "must be F32",
        out,
    )


@pytest.mark.parametrize(
    ("config", "request_", "match"),
    [
        (
            {"indexer_types": ["full"] * N, "index_topk_freq": 4, "index_skip_topk_offset": 3},
            ScheduleRequest(1),
            "disagrees",
        ),
        ({}, ScheduleRequest(pattern="FFS"), "6 layers"),
        ({}, ScheduleRequest(pattern="SFFFFF"), "Full"),
        ({}, ScheduleRequest(4), "explicit --index-skip-topk-offset"),
        ({}, ScheduleRequest(4, 0), "layer 0 Shared"),
    ],
)
def test_config_schedule_mismatch(
    toys: dict[str, Path],
    tmp_path: Path,
    config: dict[str, Any],
    request_: ScheduleRequest,
    match: str,
) -> None:
    src = edited_copy(toys["glm5"], tmp_path / "cfg", config=config)
    out = tmp_path / "out"
    assert_refused(
        lambda: convert_schedule(src, out, request_), ConfigScheduleMismatchError, match, out
    )


def test_truncated_shard_refused_before_writing(toys: dict[str, Path], tmp_path: Path) -> None:
    bad = edited_copy(toys["glm5"], tmp_path / "bad")
    shard = bad / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    out = tmp_path / "out"
    assert_refused(
        lambda: convert_schedule(bad, out, ScheduleRequest(1)), CorruptShardError, "truncated", out
    )


def test_output_exists_and_overwrite(toys: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        convert_schedule(toys["glm5"], out, ScheduleRequest(1))
    assert (out / "old.txt").exists()
    with pytest.raises(OutputExistsError, match="output is the input"):
        convert_schedule(toys["glm5"], toys["glm5"], ScheduleRequest(1), overwrite=True)
    convert_schedule(toys["glm5"], out, ScheduleRequest(1), overwrite=True)
    assert not (out / "old.txt").exists() and validate_hf_checkpoint(out).ok


def test_unsupported_model_type(toys: dict[str, Path], tmp_path: Path) -> None:
    src = edited_copy(toys["glm5"], tmp_path / "llama", config={"model_type": "llama"})
    out = tmp_path / "out"
    assert_refused(
        lambda: convert_schedule(src, out, ScheduleRequest(1)), ConfigError, "not supported", out
    )


def test_failure_mid_write_leaves_nothing(
    toys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    original = ShardedCheckpointWriter.copy_tensor

    def flaky(self: ShardedCheckpointWriter, name: str, source: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 50:
            raise OSError("disk full")
        original(self, name, source)

    monkeypatch.setattr(ShardedCheckpointWriter, "copy_tensor", flaky)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        convert_schedule(toys["glm5"], out, ScheduleRequest(4, 3))
    assert calls["n"] == 50 and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------- validation / inspect
def test_validation_report_and_inspect(toys: dict[str, Path]) -> None:
    ckpt = HFCheckpoint(toys["glm5"])
    report = validate_hf_checkpoint(ckpt)
    assert (
        report.ok
        and report.schedule is not None
        and report.schedule.all_types == ("full",) * (N + 1)
    )
    assert report.expert_formats == dict.fromkeys(range(1, N + 1), "per_expert")
    text = describe(ckpt, report, per_layer=True)
    assert (
        "glm_moe_dsa" in text
        and "status: OK" in text
        and "layer   6: F" in text
        and "(MTP)" in text
    )
    shared = validate_hf_checkpoint(ckpt, schedule=IndexCacheSchedule.from_freq_offset(N, 4, 3, 1))
    assert not shared.ok and len(shared.shared_layer_indexers) == 15
    dropped = validate_hf_checkpoint(
        ckpt, schedule=IndexCacheSchedule.from_freq_offset(N, 4, 3, 1), drop_shared_indexers=True
    )
    assert dropped.ok and "dropped" in dropped.notes[0]
    with pytest.raises(ConfigScheduleMismatchError, match="schedule covers"):
        validate_hf_checkpoint(ckpt, schedule=IndexCacheSchedule.all_full(4, 1))


def test_plan_reads_headers_only(toys: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_data(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("planning must not read tensor data")

    monkeypatch.setattr(HFCheckpoint, "read_tensor", no_data)
    plan = plan_conversion(HFCheckpoint(toys["glm5"]), ScheduleRequest(4, 3))
    assert len(plan.entries) == len(HFCheckpoint(toys["glm5"])) - 15
