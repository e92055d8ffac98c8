"""Train a DSA model with IndexCache: ``torchrun --nproc-per-node N train.py +experiment=NAME``.

Thin on purpose: compose (Hydra), validate, run. Everything else lives in ``indexcache_train``.
An input the run cannot use (config, data, run directory, checkpoint) ends it with one
``error:`` line and exit code 2, no traceback.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from indexcache_train.training.console import quiet_upstream_warnings
from indexcache_train.training.runtime import discover_ranks

quiet_upstream_warnings(discover_ranks().rank)  # before Megatron is imported

from indexcache_train.config.compose import CONFIG_DIR, register_schema, to_train_config  # noqa: E402

register_schema()


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from indexcache_train.config.validate import ConfigError
    from indexcache_train.data import DataConfigError
    from indexcache_train.training import runtime
    from indexcache_train.training.checkpointing import CheckpointError
    from indexcache_train.training.loop import run
    from indexcache_train.training.resume import ResumeError

    try:
        run(to_train_config(cfg))
    except (ConfigError, DataConfigError, ResumeError, CheckpointError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    runtime.shutdown()


if __name__ == "__main__":
    main()
