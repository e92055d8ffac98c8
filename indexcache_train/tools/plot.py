"""Figures of the analysis verbs (layer heatmaps, loss curves) through matplotlib, an optional extra.

``pip install 'indexcache-train[plots]'`` installs matplotlib. The verbs call
:func:`require_matplotlib` before any compute, so a missing install stops them at once with that
command as the fix; the CSV / JSON written next to each figure carries the numbers. Figures are
drawn on matplotlib's object API (``Figure`` + Agg canvas), never ``pyplot``: no global state and
no display needed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

PLOTS_INSTALL = "pip install 'indexcache-train[plots]'"
#: Keep at most this many tick labels on a layer axis (GLM-5 has 78 layers).
_MAX_TICKS = 16


class PlotsUnavailableError(RuntimeError):
    """matplotlib is not installed; the message names the command that installs it."""


def require_matplotlib() -> None:
    """Raise :class:`PlotsUnavailableError` (naming the fix) unless matplotlib imports."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotsUnavailableError(
            f"matplotlib is not installed, so the figures cannot be drawn. Fix: {PLOTS_INSTALL} "
            "(or pip install matplotlib)"
        ) from None


def heatmap_figure(
    matrix: Sequence[Sequence[float]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    colorbar_label: str,
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> Any:
    """A layer x layer matrix: row ``i`` / column ``j`` ticked with layer numbers.

    NaN cells (undefined pairs) are grey.
    """
    import numpy as np

    require_matplotlib()
    from matplotlib import colormaps

    values = np.ma.masked_invalid(np.asarray(matrix, dtype=float))
    fig, ax = _figure(width=6.4, height=5.6)
    cmap = colormaps["viridis"].with_extremes(bad="#a0a0a0")
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    rows, cols = values.shape
    ax.set_xticks(_layer_ticks(cols))
    ax.set_yticks(_layer_ticks(rows))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    return fig


def loss_curve_figure(
    losses: Sequence[float],
    *,
    title: str,
    xlabel: str = "step",
    ylabel: str = "loss",
    steps: Sequence[int] | None = None,
) -> Any:
    """A loss curve against its steps (``0, 1, ...`` unless ``steps`` is given).

    Non-finite losses are left out of the line (and said so in the legend).
    """
    require_matplotlib()
    xs = list(range(len(losses))) if steps is None else list(steps)
    if len(xs) != len(losses):
        raise ValueError(f"{len(xs)} steps for {len(losses)} losses")
    finite = [(x, y) for x, y in zip(xs, losses) if math.isfinite(y)]
    fig, ax = _figure(width=6.4, height=4.0)
    label = f"{len(finite)} finite of {len(losses)}" if len(finite) < len(losses) else None
    ax.plot([x for x, _ in finite], [y for _, y in finite], marker="o", label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if label:
        ax.legend()
    return fig


def _layer_ticks(n: int) -> list[int]:
    step = max(1, math.ceil(n / _MAX_TICKS))
    return list(range(0, n, step))


def _figure(width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def to_png(fig: Any) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
