"""The shell snippets README.md and docs/*.md show: one extractor for the documented-command
tests (training launches, benchmark and experiment scripts)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def snippets(text: str) -> list[str]:
    """Shell lines of fenced blocks (continuations joined) and inline code spans."""
    out: list[str] = []
    fenced = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
    for block in fenced.findall(text):
        out += [ln for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]
    prose = fenced.sub("", text)
    out += [m.replace("\n", " ") for m in re.findall(r"`([^`]+)`", prose)]
    return out
