"""Hydra glue: register the schema, turn a composed ``DictConfig`` into a typed ``TrainConfig``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from indexcache_train.config.schema import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SCHEMA_NAME = "train_schema"


def register_schema() -> None:
    """Make ``train_schema`` available to ``configs/train.yaml``'s defaults list."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Typed object (dataclass instances all the way down; ``__post_init__`` checks run)."""
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, TrainConfig):
        raise TypeError(
            f"composed config is {type(obj).__name__}, expected TrainConfig (schema not applied?)"
        )
    return obj


def compose(overrides: list[str] | None = None, config_name: str = "train") -> TrainConfig:
    """Compose without ``@hydra.main`` (tests, tools): same files, same overrides syntax."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return to_train_config(hydra_compose(config_name=config_name, overrides=overrides or []))


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
