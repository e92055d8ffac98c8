"""A tiny dependency-free PNG writer for heatmaps (8-bit RGB, zlib + struct, no matplotlib).

``encode_png`` writes one IHDR, one IDAT (filter 0 on every scanline) and IEND, which every image
viewer reads (PNG spec, ISO/IEC 15948). ``heatmap_png`` draws a matrix of values in ``[vmin,
vmax]`` as square cells with a viridis-like colour map (NaN cells grey), optional 1-pixel grid
lines between cells, and a colour bar on the right (``vmin`` at the bottom, ``vmax`` at the top).
There is no text: the CSV next to each image carries the numbers.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence

SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: Anchors of matplotlib's viridis (t = 0, 0.25, 0.5, 0.75, 1); linear in between.
_VIRIDIS = (
    (68, 1, 84),
    (59, 82, 139),
    (33, 145, 140),
    (94, 201, 98),
    (253, 231, 37),
)
NAN_RGB = (160, 160, 160)
GRID_RGB = (32, 32, 32)
BACKGROUND_RGB = (255, 255, 255)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def encode_png(width: int, height: int, rows: Sequence[bytes]) -> bytes:
    """PNG bytes of an 8-bit RGB image; ``rows``: ``height`` scanlines of ``3 * width`` bytes."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if len(rows) != height or any(len(r) != 3 * width for r in rows):
        raise ValueError(f"expected {height} rows of {3 * width} bytes")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, RGB, no interlace
    raw = b"".join(b"\x00" + bytes(r) for r in rows)
    return (
        SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


def colormap(value: float, vmin: float = 0.0, vmax: float = 1.0) -> tuple[int, int, int]:
    """Viridis-like RGB of ``value`` (clamped to ``[vmin, vmax]``); grey for NaN."""
    if math.isnan(value):
        return NAN_RGB
    t = 0.0 if vmax <= vmin else min(max((value - vmin) / (vmax - vmin), 0.0), 1.0)
    pos = t * (len(_VIRIDIS) - 1)
    lo = min(int(pos), len(_VIRIDIS) - 2)
    frac = pos - lo
    a, b = _VIRIDIS[lo], _VIRIDIS[lo + 1]
    return tuple(round(x + (y - x) * frac) for x, y in zip(a, b))  # type: ignore[return-value]


def heatmap_png(
    matrix: Sequence[Sequence[float]],
    *,
    cell: int | None = None,
    grid: bool = True,
    vmin: float = 0.0,
    vmax: float = 1.0,
    colorbar: bool = True,
) -> bytes:
    """PNG bytes of ``matrix`` (row i at the top, column j left to right) as a heatmap.

    Args:
        matrix: rows of equal length (NaN allowed).
        cell: pixels per cell side; default fits the map in about 640 pixels (2..32).
        grid: 1-pixel dark lines between cells (only when ``cell >= 4``).
        vmin, vmax: values mapped to the two ends of the colour map.
        colorbar: a vertical colour bar right of the map.
    """
    n_rows = len(matrix)
    n_cols = len(matrix[0]) if n_rows else 0
    if n_rows == 0 or n_cols == 0 or any(len(r) != n_cols for r in matrix):
        raise ValueError("heatmap needs a non-empty rectangular matrix")
    cell = cell or max(2, min(32, 640 // max(n_rows, n_cols)))
    line = 1 if grid and cell >= 4 else 0
    map_w, map_h = n_cols * cell + line, n_rows * cell + line
    bar_gap, bar_w = (max(cell, 8), 16) if colorbar else (0, 0)
    width = map_w + bar_gap + bar_w
    bg, grid_px = bytes(BACKGROUND_RGB), bytes(GRID_RGB)
    rows: list[bytes] = []
    for r in range(n_rows):
        pixels = bytearray()
        for v in matrix[r]:
            pixels += (grid_px * line) + bytes(colormap(float(v), vmin, vmax)) * (cell - line)
        pixels += grid_px * line
        cell_row = bytes(pixels)
        grid_row = grid_px * map_w
        rows += [grid_row] * line + [cell_row] * (cell - line)
    rows += [grid_px * map_w] * line
    out = []
    for y, row in enumerate(rows):
        extra = b""
        if colorbar:
            t = 1.0 - y / max(map_h - 1, 1)
            extra = bg * bar_gap + bytes(colormap(vmin + t * (vmax - vmin), vmin, vmax)) * bar_w
        out.append(row + extra)
    return encode_png(width, map_h, out)
