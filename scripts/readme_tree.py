"""Print (or check) the README file tree: one line per module, from each module's docstring.

python scripts/readme_tree.py          # print the tree
python scripts/readme_tree.py --write  # rewrite the block between the README's tree markers
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("train.py", "indexcache_train", "checkpoint_tools", "scripts")
START, END = "<!-- tree:start -->", "<!-- tree:end -->"


def _summary(path: Path) -> str:
    if path.suffix == ".py":
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    else:
        lines = [
            ln
            for ln in path.read_text().splitlines()
            if ln.startswith("#") and not ln.startswith("#!")
        ]
        doc = lines[0].lstrip("# ") if lines else ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    return first.rstrip(".")


def entries() -> list[tuple[str, str]]:
    out = []
    for root in ROOTS:
        p = REPO / root
        files = (
            [p]
            if p.is_file()
            else sorted(
                f
                for f in p.rglob("*")
                if f.suffix in (".py", ".sh", ".sbatch") and "__pycache__" not in f.parts
            )
        )
        for f in files:
            if f.name == "__init__.py" and not _summary(f):
                continue
            out.append((str(f.relative_to(REPO)), _summary(f)))
    return out


def render() -> str:
    rows = entries()
    width = max(len(p) for p, _ in rows)
    body = "\n".join(f"{p.ljust(width)}  # {s}" if s else p for p, s in rows)
    return f"{START}\n```text\n{body}\n```\n{END}"


def main() -> int:
    readme = REPO / "README.md"
    text = readme.read_text()
    a, b = text.index(START), text.index(END) + len(END)
    new = text[:a] + render() + text[b:]
    if "--write" in sys.argv:
        readme.write_text(new)
    else:
        print(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
