"""Training configuration: typed schema (``schema``), Hydra registration and validation."""

from indexcache_train.config.schema import TrainConfig

__all__ = ["TrainConfig"]
