"""Every benchmark / experiment script command README.md and docs/*.md show uses options the
script has: each ``--option`` of a documented ``scripts/bench/*.py``,
``scripts/experiments/*.py`` or ``scripts/experiments/table3.sh`` call (table3.sh passes its
extra arguments to table3.py) is in that script's ``--help``. These commands run on the device,
where a misspelt option costs a machine start; here it costs a second."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache

import pytest

from tests.helpers.doc_snippets import DOCS, REPO, snippets

pytestmark = pytest.mark.functional

SCRIPT = re.compile(r"scripts/(?:bench|experiments)/[a-z0-9_]+\.(?:py|sh)")
#: Shell scripts that pass their extra arguments to a Python script.
FORWARDS = {"scripts/experiments/table3.sh": "scripts/experiments/table3.py"}
SEPARATORS = {";", "&&", "||", "|", ";;", "do", "done"}


def _words(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # prose with an apostrophe, an unbalanced quote
        return line.split()


def documented_calls() -> list[tuple[str, str, list[str]]]:
    """``(where, script, options)`` of every documented call that passes ``--`` options."""
    calls = []
    for doc in DOCS:
        for line in snippets(doc.read_text()):
            words = [w.rstrip(";") for w in _words(line)]
            for i, w in enumerate(words):
                if not SCRIPT.fullmatch(w):
                    continue
                opts = []
                for arg in words[i + 1 :]:
                    if arg in SEPARATORS:
                        break
                    if arg.startswith("--") and len(arg) > 2:
                        opts.append(arg.split("=", 1)[0])
                script = FORWARDS.get(w, w)
                if opts and script.endswith(".py"):
                    calls.append((f"{doc.relative_to(REPO)}: {line.strip()}", script, opts))
    return calls


@cache
def help_text(script: str) -> str:
    out = subprocess.run(
        [sys.executable, str(REPO / script), "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, f"{script} --help failed:\n{out.stderr[-2000:]}"
    return out.stdout


def test_the_extractor_finds_the_device_commands() -> None:
    scripts = {script for _, script, _ in documented_calls()}
    assert {
        "scripts/experiments/table3.py",
        "scripts/bench/bench_distill.py",
        "scripts/bench/bench_glm5_layers.py",
        "scripts/bench/bench_sparse_mla.py",
    } <= scripts, scripts


def test_documented_options_exist() -> None:
    unknown = []
    for where, script, opts in documented_calls():
        known = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text(script)))
        unknown += [f"{where}\n    {script} has no {o}" for o in opts if o not in known]
    assert not unknown, "\n".join(unknown)


def test_a_misspelt_option_is_caught(monkeypatch) -> None:
    """The check can fail: a documented ``--base-step`` (for ``--base-steps``) is reported."""
    import tests.helpers.doc_snippets as ds

    real = ds.snippets
    planted = "bash scripts/experiments/table3.sh $OUT --stop-after base --base-step 200,40"
    monkeypatch.setattr(sys.modules[__name__], "snippets", lambda text: [*real(text), planted])
    with pytest.raises(AssertionError, match=r"table3.py has no --base-step\b"):
        test_documented_options_exist()
