"""Import-direction and patching contracts, enforced on the source (AST), not by convention."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "indexcache_train"
REPO = PKG.parent


def _modules(*parts: str) -> list[Path]:
    paths: list[Path] = []
    for part in parts:
        p = PKG / part
        paths.extend([p] if p.suffix == ".py" else sorted(p.rglob("*.py")))
    return paths


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _violations(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for path in paths:
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                out.append(f"{path.relative_to(REPO)} imports {name}")
    return out


def test_schedule_is_pure_python() -> None:
    assert _violations(_modules("schedule"), ("torch", "megatron", "transformers", "numpy")) == []


def test_model_and_kernels_import_no_training_code() -> None:
    training = (
        "indexcache_train.training",
        "indexcache_train.data",
        "indexcache_train.tools",
        "indexcache_train.config",
        "checkpoint_tools",
        "hydra",
        "omegaconf",
        "train",
    )
    paths = _modules("model", "ops", "loss")
    assert paths, "model code moved?"
    assert _violations(paths, training) == []


def test_loss_and_ops_do_not_import_megatron() -> None:
    # The math must run (and be tested) without Megatron; only model/ wires it into Megatron.
    assert _violations(_modules("ops", "loss"), ("megatron",)) == []


def test_only_compat_patches_torch_or_megatron() -> None:
    offenders = []
    for path in sorted(PKG.rglob("*.py")) + sorted((REPO / "checkpoint_tools").rglob("*.py")):
        if path.name == "compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AugAssign)
                else []
            )
            for t in targets:
                root = t
                while isinstance(root, ast.Attribute):
                    root = root.value
                if (
                    isinstance(t, ast.Attribute)
                    and isinstance(root, ast.Name)
                    and root.id in ("torch", "megatron")
                ):
                    offenders.append(
                        f"{path.relative_to(REPO)}:{node.lineno} assigns {ast.unparse(t)}"
                    )
    assert offenders == []


# The kernel-backend table is read by config validation, before torch or Triton is needed.
@pytest.mark.parametrize(
    "module",
    [
        "indexcache_train.schedule",
        "indexcache_train.ops.backends",
        "indexcache_train.ops.backend_triton",
        "indexcache_train.schedule.hf_keys",
        "indexcache_train.model.families",
        "indexcache_train.model.tensor_rules",
    ],
)
def test_pure_modules_import_without_torch(module: str) -> None:
    import subprocess
    import sys

    code = (
        f"import sys; sys.modules['torch'] = None; sys.modules['megatron'] = None; import {module}"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr


def test_model_code_reads_no_parallel_globals() -> None:
    # Model, ops and loss get ranks and groups from their config / arguments, never from
    # Megatron's parallel_state globals (style rule; it keeps them testable without process
    # groups and usable by tools that build one pipeline stage of another layout).
    offenders = []
    for path in _modules("model", "ops", "loss"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            offenders += [
                f"{path.relative_to(REPO)} imports {n}" for n in names if "parallel_state" in n
            ]
    assert offenders == []
