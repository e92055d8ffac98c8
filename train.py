"""Train a DSA model with IndexCache: ``torchrun --nproc-per-node N train.py +experiment=NAME``.

Thin on purpose: compose (Hydra), validate, run. Everything else lives in ``indexcache_train``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from indexcache_train.config.compose import CONFIG_DIR, register_schema, to_train_config

register_schema()


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from indexcache_train.training import runtime
    from indexcache_train.training.loop import run

    run(to_train_config(cfg))
    runtime.shutdown()


if __name__ == "__main__":
    main()
