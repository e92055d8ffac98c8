"""What a step reports: throughput, memory and the greppable step line (sinks: ``loggers``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class Throughput:
    """Tokens/s/GPU, TFLOP/s/GPU and MFU over the last step; ETA over the run so far."""

    world_size: int
    peak_tflops: float | None
    _t0: float = field(default_factory=time.perf_counter)
    _start: float = field(default_factory=time.perf_counter)
    _steps_done: int = 0

    def tick(self, tokens: int, flops: float) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self._t0, 1e-9)
        self._t0 = now
        self._steps_done += 1
        out = {
            "throughput/step_time_s": dt,
            "throughput/tokens_per_s_per_gpu": tokens / dt / self.world_size,
            "throughput/tflops_per_gpu": flops / dt / self.world_size / 1e12,
        }
        if self.peak_tflops:
            out["throughput/mfu"] = out["throughput/tflops_per_gpu"] / self.peak_tflops
        return out

    def eta_s(self, remaining_steps: int) -> float:
        per_step = (time.perf_counter() - self._start) / max(self._steps_done, 1)
        return per_step * remaining_steps


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:  # pragma: no cover - psutil is a pinned dependency
        return float("nan")


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def step_line(step: int, total: int, stage: str, metrics: dict[str, float], eta_s: float) -> str:
    """``step i/N | ...`` (greppable; one line per logged step)."""
    g = metrics.get
    mfu = g("throughput/mfu")
    parts = [
        f"step {step}/{total}",
        f"stage {stage}",
        f"lm loss {g('loss/lm', float('nan')):.4f}",
        f"indexer loss {g('loss/indexer', float('nan')):.4g}",
        f"lr {g('optim/lr', 0.0):.3e}",
        f"grad norm {g('optim/grad_norm', float('nan')):.3f}",
        f"tokens/s/GPU {g('throughput/tokens_per_s_per_gpu', 0.0):.0f}",
        f"TFLOP/s/GPU {g('throughput/tflops_per_gpu', 0.0):.2f}",
        f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}",
        f"mem {g('memory/gib', float('nan')):.2f} GiB",
        f"ETA {_fmt_eta(eta_s)}",
    ]
    return " | ".join(parts)
