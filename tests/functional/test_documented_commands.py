"""Every ``train.py`` / ``torchrun`` / ``sbatch`` / ``submit_chain.sh`` training command in
README.md and docs/*.md dry-runs at the world size it implies, so a documented command never
fails validation.

World size: ``python train.py`` 1; ``torchrun --nproc-per-node N [--nnodes M]`` N*M; ``sbatch``
/ ``submit_chain.sh`` ``--nodes`` (train.sbatch's own ``#SBATCH --nodes`` when absent) times
``GPUS_PER_NODE`` (8 unless set in the command). Placeholders are filled in: ``<...>`` with a
dummy word, shell variables from :data:`SHELL_VALUES`, a ``model.hf_path`` that does not exist
here with the matching preset's ``config.json``. Templates (``...``) and the documented
anti-example (``--multirun``) are not commands and are skipped.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.doc_snippets import DOCS, REPO, snippets

#: Example values of the shell variables documented loops use.
SHELL_VALUES = {"lr": "1e-5"}
#: model.hf_path placeholders -> the preset whose config.json stands in for the checkpoint.
HF_PLACEHOLDERS = {"/ckpt/GLM-5": "glm5", "/path/to/GLM-5": "glm5"}
GPUS_PER_NODE = 8


def _sbatch_default_nodes() -> int:
    text = (REPO / "scripts/slurm/train.sbatch").read_text()
    return int(re.search(r"^#SBATCH --nodes=(\d+)", text, re.M).group(1))


def _option(words: list[str], *names: str) -> str | None:
    for i, w in enumerate(words):
        for name in names:
            if w == name and i + 1 < len(words):
                return words[i + 1]
            if w.startswith(name + "="):
                return w.split("=", 1)[1]
    return None


def _parse(line: str) -> tuple[list[str], int] | None:
    """``(hydra overrides, world size)`` of a training command, None for anything else."""
    line = re.sub(r"<[^<>]+>", "PLACEHOLDER", line)
    for name, value in SHELL_VALUES.items():
        line = line.replace(f"${name}", value)
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if not words:
        return None
    gpus = int(env.get("GPUS_PER_NODE", GPUS_PER_NODE))
    tool = words[0]
    if tool in ("python", "python3") and words[1:2] == ["train.py"]:
        return words[2:], 1
    if tool == "torchrun" and "train.py" in words:
        i = words.index("train.py")
        nproc = int(_option(words[:i], "--nproc-per-node", "--nproc_per_node") or 1)
        nodes = int(_option(words[:i], "--nnodes") or 1)
        return words[i + 1 :], nproc * nodes
    script = next((w for w in words if w.endswith(("train.sbatch", "submit_chain.sh"))), None)
    if tool in ("sbatch", "scripts/slurm/submit_chain.sh") and script is not None:
        i = words.index(script)
        if script.endswith("submit_chain.sh"):
            if not words[i + 1 : i + 2] or not words[i + 1].isdigit():
                return None  # the script named in prose, not a submission
            opts, overrides = words[i + 2 :], []
            if "--" in opts:
                overrides = opts[opts.index("--") + 1 :]
                opts = opts[: opts.index("--")]
        else:
            opts, overrides = words[:i], words[i + 1 :]
        nodes = int(_option(opts, "--nodes", "-N") or _sbatch_default_nodes())
        return overrides, nodes * gpus
    return None


def documented_commands() -> list[tuple[str, list[str], int]]:
    found = []
    for doc in DOCS:
        for line in snippets(doc.read_text()):
            if "..." in line or "--multirun" in line:
                continue
            parsed = _parse(line)
            if parsed is not None:
                found.append((f"{doc.relative_to(REPO)}: {line.strip()}", *parsed))
    return found


def test_the_extractor_finds_the_documented_launches() -> None:
    commands = documented_commands()
    by_doc = {where.split(":")[0] for where, _, _ in commands}
    assert {"README.md", "docs/launching.md"} <= by_doc
    worlds = {world for _, _, world in commands}
    assert {1, 2, 8, 512} <= worlds, worlds  # laptop, torchrun, one node, 64 nodes
    readme_sbatch = [c for c in commands if c[0].startswith("README.md: sbatch --nodes 64")]
    assert readme_sbatch and readme_sbatch[0][2] == 512


def _hf_dir(tmp: Path, preset: str) -> Path:
    from indexcache_train.model.presets import preset_hf_config

    d = tmp / preset
    if not d.is_dir():
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(preset_hf_config(preset)))
    return d


@pytest.mark.timeout(1500)
def test_every_documented_command_dry_runs(tmp_path: Path, subprocess_env) -> None:
    runs: dict[tuple[tuple[str, ...], int], list[str]] = {}
    for where, overrides, world in documented_commands():
        fixed = []
        for o in overrides:
            key, _, value = o.partition("=")
            if key in ("run.dry_run", "run.world_size", "run.root"):
                continue  # set below
            if key == "model.hf_path" and value in HF_PLACEHOLDERS:
                o = f"{key}={_hf_dir(tmp_path, HF_PLACEHOLDERS[value])}"
            fixed.append(o)
        args = (*fixed, "run.dry_run=true", f"run.world_size={world}", f"run.root={tmp_path}")
        runs.setdefault((args, world), []).append(where)
    jobs = [(list(args), where) for (args, _), where in runs.items()]
    code = (
        "import sys, json; from indexcache_train.config.compose import compose\n"
        "from indexcache_train.training.loop import run\n"
        "for args, where in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        run(compose(args))\n"
        "    except Exception as e:\n"
        "        print('DRY-RUN-FAILED', where, '->', type(e).__name__, e, flush=True)\n"
        "    else:\n"
        "        print('DRY-RUN-OK', flush=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(jobs)],
        env=subprocess_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1400,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    failed = [ln for ln in out.stdout.splitlines() if ln.startswith("DRY-RUN-FAILED")]
    assert failed == [], "\n".join(failed)
    assert out.stdout.count("DRY-RUN-OK") == len(jobs)
