"""Config composition and validation fail early, with messages that name the field and the fix."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from indexcache_train.config.compose import compose
from indexcache_train.config.validate import ConfigError, validate


def test_toy_composes_typed() -> None:
    cfg = compose(["+experiment=toy"])
    assert cfg.model.preset == "glm5_toy" and cfg.indexcache.index_topk_freq == 2
    assert [s.name for s in cfg.recipe.stages] == ["warmup", "sparse"]
    r = validate(cfg, world_size=1)
    assert (
        r.model.schedule.pattern == "FSFS" and r.num_microbatches == 2 and r.pipeline_layout is None
    )


@pytest.mark.parametrize(
    "override", ["optim.lrr=1e-3", "model.seqlen=128", "recipe.stages.0.lrr=1"]
)
def test_typo_fails_at_compose(override: str) -> None:
    with pytest.raises(
        (ConfigCompositionException, ConfigKeyError, ConfigAttributeError, ValidationError)
    ) as e:
        compose(["+experiment=toy", override])
    assert override.split("=")[0].split(".")[-1] in str(e.value) + str(e.value.__cause__)


def test_typo_inside_a_yaml_stage_fails() -> None:
    from omegaconf import OmegaConf

    from indexcache_train.config.schema import TrainConfig

    with pytest.raises(ConfigKeyError, match="stepz"):
        OmegaConf.merge(
            OmegaConf.structured(TrainConfig), {"recipe": {"stages": [{"name": "a", "stepz": 3}]}}
        )


def test_wrong_type_fails_at_compose() -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose(["+experiment=toy", "optim.micro_batch_size=two"])


@pytest.mark.parametrize(
    "overrides,world,match",
    [
        (
            ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
            3,
            "not divisible by tp",
        ),
        (["parallel.tensor_model_parallel_size=2"], 2, "requires parallel.sequence_parallel=true"),
        (["parallel.expert_model_parallel_size=3"], 2, "expert_model_parallel_size=3 must divide"),
        (["optim.global_batch_size=3"], 1, "multiple of micro_batch_size"),
        (["distill=none", "recipe=toy_two_stage"], 1, "distill.mode=none gives them no loss"),
        (["recipe.stages.0.attention=sparce"], 1, "attention='sparce'"),
        (
            ["indexcache.index_topk_freq=4", "indexcache.index_skip_topk_offset=null"],
            1,
            "explicit index_skip_topk_offset",
        ),
        (["model.overrides.vocab_size=1000"], 1, "tokenizer has 50257 tokens"),
        (
            ["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_layout=Et|tttmL"],
            2,
            "pipeline_layout",
        ),
    ],
)
def test_inconsistent_config_fails_validation(overrides: list[str], world: int, match: str) -> None:
    cfg = compose(["+experiment=toy", *overrides])
    with pytest.raises(ConfigError, match=match):
        validate(cfg, world_size=world)


def test_glm5_even_split_on_8_stages_is_refused_with_layer_names() -> None:
    cfg = compose(
        [
            "+experiment=glm5_freq4",
            "parallel.pipeline_model_parallel_size=8",
            "parallel.pipeline_layout=even",
            "parallel.num_layers_in_last_pipeline_stage=8",
        ]
    )
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=8 * 4 * 8)
    msg = str(e.value)
    assert (
        "20" in msg and "18" in msg
    )  # layer 20 (Shared) whose source 18 sits on the previous stage
    assert "Et" in msg  # proposes a valid Megatron layout


def test_glm5_auto_layout_is_accepted() -> None:
    cfg = compose(["+experiment=glm5_freq4"])
    r = validate(cfg, world_size=512)
    assert r.pipeline_layout and r.pipeline_layout.count("|") == 15 and r.data_parallel_size == 8


@pytest.mark.parametrize(
    "override,named",
    [
        ("+optim.lrr=1e-3", "optim.lrr"),
        ("+run.note=hi", "run.note"),
        ("+recipe.stages.0.stepz=3", "recipe.stages.0.stepz (did you mean steps?)"),
        ("+logging.wandb_mod=online", "logging.wandb_mod (did you mean wandb_mode?)"),
    ],
)
def test_plus_override_of_unknown_key_is_refused(override: str, named: str) -> None:
    # Hydra's hint for a typo is the `+key=value` form, which adds the key; to_object would then
    # drop it silently.
    with pytest.raises(ConfigError, match="unknown config key") as e:
        compose(["+experiment=toy", override])
    assert named in str(e.value)


def test_plus_override_into_free_form_dict_is_accepted() -> None:
    cfg = compose(["+experiment=toy", "+model.overrides.rms_norm_eps=1e-5"])
    assert cfg.model.overrides["rms_norm_eps"] == 1e-5


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["optim.micro_batch_size=0"], r"optim.micro_batch_size=0 must be >= 1"),
        (["optim.global_batch_size=0"], r"optim.global_batch_size=0 must be >= 1"),
        (
            ["indexcache.index_skip_topk_offset=4"],
            r"index_skip_topk_offset=4 is past the model's 4 layers",
        ),
        (
            ["indexcache.index_topk_freq=4", "indexcache.index_skip_topk_offset=9"],
            r"offset=9 is past the model's 4 layers.*every layer would be Full",
        ),
        (["+model.overrides.index_topk=128"], r"index_topk=128 >= model.seq_length=128"),
        (["model.seq_length=8192"], r"exceeds the model's max_position_embeddings=4096"),
        (["logging.log_interval=0"], r"logging.log_interval=0 must be >= 1"),
        (["logging.eval_iters=0"], r"logging.eval_iters=0 must be >= 1"),
        (["logging.eval_rows=-1"], r"logging.eval_rows=-1 must be >= 0"),
        (["logging.wandb_mode=ofline"], r"logging.wandb_mode='ofline': use one of"),
    ],
)
def test_silently_wrong_configs_are_refused(overrides: list[str], match: str) -> None:
    cfg = compose(["+experiment=toy", *overrides])
    with pytest.raises(ConfigError, match=match):
        validate(cfg, world_size=1)


def test_index_topk_equal_to_seq_length_is_fine_for_a_dense_only_recipe() -> None:
    # Top-k never applies without a sparse stage (e.g. dense pre-training).
    cfg = compose(
        [
            "+experiment=toy",
            "+model.overrides.index_topk=128",
            "recipe.stages.1.attention=dense",
            "recipe.stages.1.trainable=indexers",
        ]
    )
    validate(cfg, world_size=1)


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_wandb_without_the_package_is_refused_at_validation(mode: str, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    cfg = compose(["+experiment=toy", f"logging.wandb_mode={mode}"])
    with pytest.raises(ConfigError, match=r"needs the wandb package.*wandb_mode=disabled"):
        validate(cfg, world_size=1)


def test_tensorboard_without_the_package_is_refused_at_validation(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real(name, *a),
    )
    cfg = compose(["+experiment=toy", "logging.tensorboard=true"])
    with pytest.raises(ConfigError, match=r"needs the tensorboard package"):
        validate(cfg, world_size=1)
