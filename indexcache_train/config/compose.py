"""Hydra glue: register the schema, turn a composed ``DictConfig`` into a typed ``TrainConfig``."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from indexcache_train.config.schema import TrainConfig
from indexcache_train.config.validate import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SCHEMA_NAME = "train_schema"


def register_schema() -> None:
    """Make ``train_schema`` available to ``configs/train.yaml``'s defaults list."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


def unknown_keys(node: DictConfig | ListConfig, path: str = "") -> list[str]:
    """Keys of ``node`` that its schema dataclass does not have, as ``section.key (hint)``.

    Hydra's ``+section.key=value`` adds a key even where the schema has no such field (and
    Hydra's own error for a misspelt key suggests exactly that form); ``OmegaConf.to_object``
    then drops it without a word. Free-form dicts (``model.overrides``) take any key.
    """
    out: list[str] = []
    if isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            if isinstance(child, DictConfig | ListConfig):
                out += unknown_keys(child, f"{path}.{i}")
        return out
    schema = OmegaConf.get_type(node)
    if schema is None or not dataclasses.is_dataclass(schema):
        return out
    names = [f.name for f in dataclasses.fields(schema)]
    for key in node.keys():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            out.append(where + (f" (did you mean {close[0]}?)" if close else ""))
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig | ListConfig):
            out += unknown_keys(child, where)
    return out


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Typed object (dataclass instances all the way down; ``__post_init__`` checks run).

    Raises:
        ConfigError: A key the schema does not have (added with ``+section.key=...``).
    """
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(
            f"unknown config key(s): {', '.join(unknown)}. The schema "
            "(indexcache_train/config/schema.py) has no such field, so the value would be "
            "ignored; fix the spelling and set existing keys without '+'"
        )
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
