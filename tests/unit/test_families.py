"""The model-family registry: each record against transformers 5.17, and each family's toy
through import -> export (bit-exact) and transformers logits parity, including a family that a
test adds through the registry alone (no code outside this file knows it)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transformers

from checkpoint_tools.convert_schedule import IndexerDims, ScheduleRequest, convert_schedule
from checkpoint_tools.errors import ConfigError
from checkpoint_tools.hf_io import HFCheckpoint
from checkpoint_tools.import_megatron import plan_import
from checkpoint_tools.verify import verify
from indexcache_train.model.config import ModelConfig
from indexcache_train.model.families import (
    FAMILIES,
    GLM_MOE_DSA,
    TOY_SIZES,
    ModelFamily,
    Preset,
    register_family,
    unregister_family,
)
from indexcache_train.model.presets import PRESETS, preset_hf_config
from indexcache_train.model.tensor_rules import TensorRule
from tests.helpers.hf_toys import save_toy_checkpoint
from tests.helpers.megatron_env import init_single_process

REGISTERED = sorted(FAMILIES)


@pytest.fixture(scope="module")
def megatron() -> None:
    init_single_process()


def _rules(family: ModelFamily) -> list[TensorRule]:
    """The rules that can apply to this family (indexer rules only where it has indexers)."""
    table = family.tensors
    rules = [*table.head, *table.layer, *table.mtp, *table.tail]
    return [r for r in rules if family.has_indexers or "full" not in r.when]


# ---------------------------------------------------------------------- records vs transformers
@pytest.mark.parametrize("model_type", REGISTERED)
def test_record_matches_transformers(model_type: str) -> None:
    family = FAMILIES[model_type]
    assert family.hf_model_class().__name__ == family.architecture
    defaults = family.hf_config_class()().to_dict()
    assert {k: defaults.get(k) for k in family.hf_defaults} == dict(family.hf_defaults)
    assert defaults.get("rope_interleave", True) is family.rope_interleave
    if family.has_indexers:
        assert family.index_defaults == tuple(
            defaults[k] for k in ("index_topk", "index_head_dim", "index_n_heads")
        )
    model_cls = family.hf_model_class()
    keep = [
        *(model_cls._keep_in_fp32_modules or []),
        *(model_cls._keep_in_fp32_modules_strict or []),
    ]
    strict = list(model_cls._keep_in_fp32_modules_strict or [])
    for rule in _rules(family):
        name = rule.hf[0]
        assert rule.fp32 == any(p in name for p in keep), name
        assert rule.fp32_strict == any(p in name for p in strict), name


@pytest.mark.parametrize("model_type", REGISTERED)
def test_record_predicts_what_transformers_builds(model_type: str) -> None:
    """Indexers per schedule role, and dense / MoE MLPs from the keys transformers reads."""
    family = FAMILIES[model_type]
    types = ["full", "shared", "full", "shared"]
    cases: list[dict[str, Any]] = [
        {"first_k_dense_replace": 2},
        {"first_k_dense_replace": 2, "mlp_layer_types": ["dense"] + ["sparse"] * 3},
        {},
    ]
    for keys in cases:
        config = family.toy_hf_config(0, **keys)
        for key in ("first_k_dense_replace", "mlp_layer_types"):
            if key not in keys:
                config.pop(key, None)
        raw = {**config, **keys}
        if family.has_indexers:
            raw["indexer_types"] = types
        model = family.hf_model_class()(family.hf_config_class()(**raw))
        built = [
            "sparse" if hasattr(layer.mlp, "experts") else "dense" for layer in model.model.layers
        ]
        assert built == family.mlp_layer_types(raw), keys
        if family.has_indexers:
            no_indexer = [layer.self_attn.indexer is None for layer in model.model.layers]
            want = [t == "shared" for t in types] if family.supports_shared_layers else [False] * 4
            assert no_indexer == want
        else:
            assert not any(hasattr(layer.self_attn, "indexer") for layer in model.model.layers)


def test_indexer_rope_conventions_match_transformers_source() -> None:
    from transformers.models.deepseek_v32 import modeling_deepseek_v32
    from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa

    glm = inspect.getsource(modeling_glm_moe_dsa.GlmMoeDsaIndexer.forward)
    dsv32 = inspect.getsource(modeling_deepseek_v32.DeepseekV32Indexer.forward)
    assert "apply_rotary_pos_emb_interleave" in glm
    assert "apply_rotary_pos_emb(" in dsv32 and "interleave(" not in dsv32
    assert FAMILIES["glm_moe_dsa"].indexer_rope_interleave is True
    assert FAMILIES["deepseek_v32"].indexer_rope_interleave is False


def test_presets_come_from_the_records() -> None:
    for name in PRESETS:
        config = preset_hf_config(name)
        family = FAMILIES[config["model_type"]]
        assert name in family.presets
        assert ModelConfig.from_hf_config(config).family == family.model_type
        # The torch-free subset the schedule tools use agrees with the full config.
        keys = family.preset_keys(name)
        assert {k: config.get(k) for k in keys} == keys, name
    with pytest.raises(KeyError, match="unknown model preset 'glm9'"):
        preset_hf_config("glm9")


# ---------------------------------------------------------------------- round trip + parity
def _save_family_toy(family: ModelFamily, directory: Path) -> Path:
    """The family's toy as an HF checkpoint (an MTP layer added); Shared layers where allowed."""
    schedule = (
        {"index_topk_freq": 2, "index_skip_topk_offset": 2} if family.supports_shared_layers else {}
    )
    config = family.toy_hf_config(**schedule)
    config.pop("num_nextn_predict_layers")
    return save_toy_checkpoint(family.hf_config_class()(**config), directory)


def _verify_family(family: ModelFamily, tmp_path: Path) -> None:
    src = _save_family_toy(family, tmp_path / "hf")
    if not family.has_indexers:  # the trainer builds DSA models: add indexers first
        dims = IndexerDims(
            *(TOY_SIZES[k] for k in ("index_topk", "index_head_dim", "index_n_heads"))
        )
        convert_schedule(src, tmp_path / "dsa", ScheduleRequest(1), index_dims=dims)
        src = tmp_path / "dsa"
    result = verify(src, work_dir=tmp_path)
    report = (
        result.l1.table() + "\n" + (result.l2.table() if result.l2 else str(result.skip_reason))
    )
    assert result.l1.passed and result.l1.compared > 0, report
    assert result.l2 is not None and result.l2.passed, report


@pytest.mark.parametrize("model_type", REGISTERED)
def test_round_trip_and_parity_on_each_family_toy(
    model_type: str, tmp_path: Path, megatron: None
) -> None:
    _verify_family(FAMILIES[model_type], tmp_path)


# ---------------------------------------------------------------------- a family added by a test
class ToyDsaConfig(transformers.GlmMoeDsaConfig):
    """A transformers config for a model_type transformers does not ship."""

    model_type = "toy_dsa"


class ToyDsaForCausalLM(transformers.GlmMoeDsaForCausalLM):
    config_class = ToyDsaConfig


def _teach_transformers_toy_dsa() -> None:
    """What a transformers release that ships a model does: auto classes and the checkpoint
    conversion (per-expert file names), here borrowed from GLM-5."""
    from transformers import conversion_mapping

    transformers.AutoConfig.register("toy_dsa", ToyDsaConfig, exist_ok=True)
    transformers.AutoModelForCausalLM.register(ToyDsaConfig, ToyDsaForCausalLM, exist_ok=True)
    glm = conversion_mapping.get_checkpoint_conversion_mapping("glm_moe_dsa")
    conversion_mapping.register_checkpoint_conversion_mapping("toy_dsa", glm, overwrite=True)


@pytest.fixture
def toy_dsa_family() -> Iterator[ModelFamily]:
    _teach_transformers_toy_dsa()
    family = dataclasses.replace(
        GLM_MOE_DSA,
        model_type="toy_dsa",
        architecture="ToyDsaForCausalLM",
        dsa_model_type="toy_dsa",
        presets={"toy_dsa_toy": Preset(toy=True)},
    )
    yield register_family(family)
    unregister_family("toy_dsa")


def test_unregistered_family_is_refused(tmp_path: Path) -> None:
    _teach_transformers_toy_dsa()
    config = ToyDsaConfig(**TOY_SIZES)
    ToyDsaForCausalLM(config).save_pretrained(tmp_path / "hf")  # transformers knows it; we do not
    with pytest.raises(ConfigError, match="model_type 'toy_dsa' is not supported"):
        plan_import(HFCheckpoint(tmp_path / "hf"))
    with pytest.raises(ValueError, match="toy_dsa"):
        ModelConfig.from_hf_config(config.to_dict())


def test_family_added_through_the_registry_alone(
    toy_dsa_family: ModelFamily, tmp_path: Path, megatron: None
) -> None:
    assert preset_hf_config("toy_dsa_toy")["model_type"] == "toy_dsa"
    _verify_family(toy_dsa_family, tmp_path)
    exported = ModelConfig.from_hf_config(HFCheckpoint(tmp_path / "hf").config).to_hf_config()
    assert exported["model_type"] == "toy_dsa"
    assert exported["architectures"] == ["ToyDsaForCausalLM"]
