"""The README's file tree lists every module with its docstring summary (regenerate with
``python scripts/readme_tree.py --write``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _tree_module():
    spec = importlib.util.spec_from_file_location("readme_tree", REPO / "scripts/readme_tree.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_readme_tree_is_current() -> None:
    mod = _tree_module()
    readme = (REPO / "README.md").read_text()
    assert mod.render() in readme, (
        "README file tree is stale: run python scripts/readme_tree.py --write"
    )


def test_every_module_has_a_summary_line() -> None:
    missing = [p for p, s in _tree_module().entries() if not s]
    assert missing == []
