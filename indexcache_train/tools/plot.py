"""Dependency-free line plots (a loss curve as a PNG), drawn pixel by pixel; no matplotlib.

:func:`line_plot_png` draws one series (x = its index) inside a framed plot area with light
horizontal grid lines at the quarter marks of the y range, a 2-pixel polyline and a square marker
per point; :mod:`indexcache_train.tools.png` encodes it. There is no text: the y range is the
data's (padded by 5%), and the JSON written next to each image carries the numbers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from indexcache_train.tools.png import encode_png

Rgb = tuple[int, int, int]
BACKGROUND: Rgb = (255, 255, 255)
FRAME: Rgb = (0, 0, 0)
GRID: Rgb = (220, 220, 220)
LINE: Rgb = (31, 119, 180)
MARKER: Rgb = (214, 39, 40)


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(BACKGROUND) * (width * height))

    def set(self, x: int, y: int, rgb: Rgb) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(rgb)

    def rect(self, x0: int, y0: int, x1: int, y1: int, rgb: Rgb) -> None:
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                self.set(x, y, rgb)

    def line(self, x0: int, y0: int, x1: int, y1: int, rgb: Rgb, thick: int = 1) -> None:
        """Bresenham-like segment sampled at one point per pixel of its longer extent."""
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for k in range(n + 1):
            x = round(x0 + (x1 - x0) * k / n)
            y = round(y0 + (y1 - y0) * k / n)
            self.rect(x, y, x + thick - 1, y + thick - 1, rgb)

    def rows(self) -> list[bytes]:
        w = 3 * self.width
        return [bytes(self.pixels[y * w : (y + 1) * w]) for y in range(self.height)]


def render_line_plot(values: Sequence[float], width: int = 640, height: int = 400) -> list[bytes]:
    """RGB scanlines (``height`` rows of ``3 * width`` bytes) of ``values`` against their index.

    Non-finite values are skipped (no marker, the line jumps over them).
    """
    if width < 64 or height < 64:
        raise ValueError(f"plot size {width}x{height} is too small (>= 64x64)")
    c = _Canvas(width, height)
    left, right, top, bottom = 16, width - 17, 16, height - 17
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    pad = (hi - lo) * 0.05 or max(abs(hi) * 0.05, 1e-6)
    lo, hi = lo - pad, hi + pad
    for q in range(1, 4):
        y = round(top + (bottom - top) * q / 4)
        c.line(left, y, right, y, GRID)
    for x0, y0, x1, y1 in (
        (left, top, right, top),
        (left, bottom, right, bottom),
        (left, top, left, bottom),
        (right, top, right, bottom),
    ):
        c.line(x0, y0, x1, y1, FRAME)
    span = max(len(values) - 1, 1)
    points = [
        (
            round(left + 6 + (right - left - 12) * i / span),
            round(bottom - 6 - (bottom - top - 12) * (v - lo) / (hi - lo)),
        )
        if math.isfinite(v)
        else None
        for i, v in enumerate(values)
    ]
    drawn = [p for p in points if p is not None]
    for a, b in itertools.pairwise(drawn):
        c.line(a[0], a[1], b[0], b[1], LINE, thick=2)
    for x, y in drawn:
        c.rect(x - 2, y - 2, x + 2, y + 2, MARKER)
    return c.rows()


def line_plot_png(values: Sequence[float], width: int = 640, height: int = 400) -> bytes:
    """PNG bytes of :func:`render_line_plot`."""
    return encode_png(width, height, render_line_plot(values, width, height))
