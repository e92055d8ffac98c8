"""Figures of the analysis verbs (matplotlib): axes, ticks, labels, and the missing-extra error."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from indexcache_train.tools.plot import (
    PLOTS_INSTALL,
    PlotsUnavailableError,
    heatmap_figure,
    loss_curve_figure,
    require_matplotlib,
    to_png,
)
from tests.helpers.images import read_png

pytestmark = pytest.mark.unit


def test_heatmap_has_layer_ticks_labels_title_and_colorbar(tmp_path: Path) -> None:
    matrix = [[0.0, 0.5, 1.0], [float("nan"), 0.25, 0.75], [1.0, 0.0, 0.5]]
    fig = heatmap_figure(matrix, title="T", xlabel="layer j", ylabel="layer i", colorbar_label="c")
    ax, bar = fig.axes
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("T", "layer j", "layer i")
    assert list(ax.get_xticks()) == [0, 1, 2] and list(ax.get_yticks()) == [0, 1, 2]
    assert bar.get_ylabel() == "c"
    image = ax.images[0]
    assert image.get_clim() == (0.0, 1.0) and image.get_array().mask[1][0]  # NaN masked (grey)
    (tmp_path / "h.png").write_bytes(to_png(fig))
    assert read_png(tmp_path / "h.png").shape[:2] == (560, 640)


def test_heatmap_thins_layer_ticks_of_a_deep_model() -> None:
    fig = heatmap_figure([[0.5] * 78] * 78, title="t", xlabel="x", ylabel="y", colorbar_label="c")
    ticks = list(fig.axes[0].get_xticks())
    assert ticks[0] == 0 and len(ticks) <= 16 and ticks == list(range(0, 78, ticks[1]))


def test_loss_curve_has_step_axis_labels_and_skips_non_finite() -> None:
    fig = loss_curve_figure(
        [3.0, 2.5, math.nan, 2.0], title="search", xlabel="step", ylabel="loss", steps=[0, 1, 2, 3]
    )
    ax = fig.axes[0]
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [0, 1, 3] and list(line.get_ydata()) == [3.0, 2.5, 2.0]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("search", "step", "loss")
    assert ax.get_legend().get_texts()[0].get_text() == "3 finite of 4"
    with pytest.raises(ValueError, match="2 steps for 3 losses"):
        loss_curve_figure([1.0, 2.0, 3.0], title="t", steps=[0, 1])


def test_missing_matplotlib_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from indexcache_train.tools.__main__ import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(PlotsUnavailableError, match=PLOTS_INSTALL.replace("[", r"\[")):
        require_matplotlib()
    out = tmp_path / "out"
    argv = ["--model", "glm5_toy", "--data", "random", "--batches", "1", "--seq", "8"]
    assert main(["overlap", *argv, "--out", str(out)]) == 2
    assert PLOTS_INSTALL in capsys.readouterr().err and not out.exists()
    assert main(["search", "--model", "glm5_toy", "--target-full", "2", "--out", str(out)]) == 2
    assert PLOTS_INSTALL in capsys.readouterr().err and not out.exists()
