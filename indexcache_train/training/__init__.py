"""The training job: runtime setup, recipe stages, loop, checkpoints, metrics (imports Megatron)."""
