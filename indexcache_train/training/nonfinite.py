"""The non-finite guard: a step whose losses or gradients are NaN/inf never reaches the model.

``optim.on_nonfinite=stop`` raises before the update; ``skip`` drops it (at most
``optim.max_consecutive_skips`` in a row). Not calling ``optimizer.step()`` protects the
parameters and the optimizer state, but not everything a step changes: Megatron-Core updates
the MoE routers' ``expert_bias`` (aux-loss-free balancing) inside ``finalize_model_grads``, at
the end of the backward pass, before any guard can look at the gradients. So the guard
snapshots every floating-point buffer of the model before the step and puts them back when the
step is dropped: a skipped step leaves every parameter and buffer as it found them.

Usage, per step::

    snapshot = BufferSnapshot(chunks)             # before forward/backward
    result = runner.run(...)                      # forward, backward, finalize_model_grads
    reason = nonfinite_reason(result, ddp_chunks, frozen_trunk=..., device=...)
    if guard.check(reason, step):                 # raises for stop / too many skips
        snapshot.restore()                        # skip: undo the buffer updates
    else:
        optimizer.step()
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["BufferSnapshot", "NonFiniteGuard", "nonfinite_reason"]

log = logging.getLogger("indexcache_train")


class NonFiniteGuard:
    """``optim.on_nonfinite``: stop at the first non-finite step, or skip up to N in a row.

    Args:
        mode: ``stop`` or ``skip``.
        max_consecutive: With ``skip``: the most non-finite steps in a row before stopping.
    """

    def __init__(self, mode: str, max_consecutive: int) -> None:
        self.mode, self.max_consecutive = mode, max_consecutive
        self.consecutive = 0

    def check(self, reason: str | None, step: int) -> bool:
        """Whether to skip this step's update (``reason`` None: a finite step, never skipped).

        Raises:
            FloatingPointError: ``stop`` mode, or more skips in a row than allowed.
        """
        if reason is None:
            self.consecutive = 0
            return False
        self.consecutive += 1
        if self.mode == "stop":
            raise FloatingPointError(
                f"step {step}: {reason}; stopped before the update, so the weights and the last "
                "checkpoint are clean. Lower the learning rate or resume with "
                "optim.on_nonfinite=skip to drop such steps"
            )
        if self.consecutive > self.max_consecutive:
            raise FloatingPointError(
                f"step {step}: {reason}, the {self.consecutive}th non-finite step in a row "
                f"(optim.max_consecutive_skips={self.max_consecutive}); the run diverged, "
                "resume from an earlier checkpoint with a lower learning rate"
            )
        log.warning("step %d: %s; update skipped (optim.on_nonfinite=skip)", step, reason)
        return True


def nonfinite_reason(
    result: Any, ddp_chunks: list, *, frozen_trunk: bool, device: torch.device
) -> str | None:
    """Why this step must not update (None: it may).

    The losses in ``result`` (a :class:`~indexcache_train.training.step.StepResult`) are
    already reduced over the world; the gradient flag is reduced here, so every rank takes the
    same decision. A frozen trunk's LM loss trains nothing and is not checked.
    """
    if not frozen_trunk and not math.isfinite(result.lm_loss):
        return f"non-finite LM loss ({result.lm_loss})"
    bad_terms = sorted(pair for pair, v in result.kl.items() if not math.isfinite(v))
    if bad_terms:
        return f"non-finite distillation terms (Full layer -> served layer) {bad_terms}"
    flag = torch.zeros(1, device=device)
    for chunk in ddp_chunks:
        for buf in [*chunk.buffers, *chunk.expert_parallel_buffers]:
            flag = torch.maximum(flag, (~torch.isfinite(buf.grad_data)).any().float())
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return "non-finite gradients" if float(flag) > 0 else None


class BufferSnapshot:
    """Copies of every floating-point buffer of ``modules`` (e.g. the routers' expert bias),
    restorable after a step whose update is dropped. Buffers are small (GLM-5: ~75 x 256
    expert biases), so one copy per step costs nothing measurable."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self._saved = [
            (buf, buf.detach().clone())
            for m in modules
            for buf in m.buffers()
            if buf.is_floating_point()
        ]

    @torch.no_grad()
    def restore(self) -> None:
        for buf, saved in self._saved:
            buf.copy_(saved)
