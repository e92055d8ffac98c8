"""Decode the PNGs the analysis verbs write (through matplotlib, which draws them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_png(path: Path) -> np.ndarray:
    """``[height, width, channels]`` floats in 0..1; fails on anything that is not a PNG."""
    from matplotlib import image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    return image.imread(path, format="png")
