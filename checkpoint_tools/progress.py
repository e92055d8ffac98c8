"""Byte-count progress for the checkpoint tools (never used by the trainer).

tqdm when it is installed, otherwise one rewritten stderr line at most once a second. A disabled
bar is a null object, so callers never branch on ``if progress``.
"""

from __future__ import annotations

import sys
import time
from typing import Protocol


class Progress(Protocol):
    """What the tools call; all three implementations below satisfy it."""

    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


class NullProgress:
    """Disabled progress: every call is a no-op."""

    def update(self, n: int) -> None:
        del n

    def close(self) -> None:
        pass


class LineProgress:
    """Fallback without tqdm: ``desc: 12.3/45.6 GB (27%)`` rewritten in place on stderr."""

    def __init__(self, total: int, desc: str, interval_s: float = 1.0) -> None:
        self.total, self.desc, self.interval_s = total, desc, interval_s
        self.done = 0
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval_s or self.done >= self.total:
            self._last = now
            pct = 100.0 * self.done / self.total if self.total else 100.0
            sys.stderr.write(
                f"\r{self.desc}: {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB ({pct:.0f}%)"
            )
            sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def make_progress(total: int, desc: str, enabled: bool = True) -> Progress:
    """A byte-count bar over ``total`` bytes; :class:`NullProgress` when ``enabled`` is False."""
    if not enabled:
        return NullProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return LineProgress(total, desc)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)
