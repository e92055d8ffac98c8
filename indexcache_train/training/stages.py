"""The recipe as a step -> stage map (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass

from indexcache_train.config.schema import StageSection, TrainConfig
from indexcache_train.model.forward_state import DistillSettings


@dataclass(frozen=True)
class StagePosition:
    index: int
    stage: StageSection
    step_in_stage: int

    @property
    def is_last_step_of_stage(self) -> bool:
        return self.step_in_stage == self.stage.steps - 1


def position(cfg: TrainConfig, step: int) -> StagePosition:
    """Stage of the 0-based global ``step``."""
    start = 0
    for i, s in enumerate(cfg.recipe.stages):
        if step < start + s.steps:
            return StagePosition(i, s, step - start)
        start += s.steps
    raise IndexError(f"step {step} is past the recipe's {start} steps")


def distill_settings(cfg: TrainConfig, *, training: bool = True) -> DistillSettings:
    d = cfg.distill
    return DistillSettings(
        mode=d.mode,  # type: ignore[arg-type]
        weights=tuple(d.weights) if d.weights is not None else "uniform",
        loss_coeff=d.loss_coeff,
        chunk=d.chunk,
        compute_grad=training,
    )
