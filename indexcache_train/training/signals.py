"""Graceful stop: SIGTERM, SIGUSR1 and Ctrl-C (SIGINT) save at the next step boundary.

A handler only sets a flag (a rank may get SIGTERM twice: from Slurm and from torchrun); all
ranks agree on it at the next step boundary (one all-reduce), save and exit. A second Ctrl-C
means "now": it raises ``KeyboardInterrupt`` at once, without saving.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

import torch
import torch.distributed as dist

__all__ = ["StopRequest"]

log = logging.getLogger("indexcache_train")


class StopRequest:
    """The stop flag and the signal handlers that set it."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Give the signals back to the handlers found at :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt  # second Ctrl-C: stop now, no checkpoint
            log.warning(
                "Ctrl-C: saving a checkpoint at the end of this step, then exiting "
                "(press Ctrl-C again to exit at once, without saving)"
            )
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop (collective: call on every rank)."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
