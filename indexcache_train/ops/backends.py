"""Kernel-backend table and dispatcher: which fused kernels may run an operator, and in what order.

A backend is a module, imported on first use, that defines one *hook* per operator it implements
(``indexer_topk``, ``dense_attention``, ``sparse_mla``, ``sparse_distill``, ``dense_distill``).
A hook takes the operator's inputs as keyword arguments and either runs its kernel or returns
:class:`Declined` with the reason (wrong device, head dims it does not take, Triton missing, a
tensor-parallel case it does not handle, ...) *before* any compute. ``model.kernel_backend``:

* ``auto``: the backends in table order; each distinct decline reason is logged once (python
  logging, every rank), the next backend is tried, and the PyTorch reference runs last;
* ``torch``: the reference only (CPU, tests, debugging);
* a backend's name (``triton``): that backend must take the call, else
  :class:`KernelUnavailableError` names the reason and the fix.

Config validation asks the same table (:func:`model_declines`) so a named backend is refused for
a model it cannot run before anything is built. This module imports neither torch nor Triton.
Adding a backend (FlashMLA, cuDNN, Transformer Engine): docs/design.md, "How to add a kernel
backend".
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

OPERATORS = ("indexer_topk", "dense_attention", "sparse_mla", "sparse_distill", "dense_distill")


@dataclass(frozen=True)
class Declined:
    """A hook's answer when its kernel cannot run these inputs; ``reason`` is a sentence."""

    reason: str


@dataclass(frozen=True)
class KernelBackend:
    """One row of the table: ``module`` defines the hooks (and ``model_declines``)."""

    name: str
    module: str
    summary: str


#: Tried in this order under ``auto``. FlashMLA / cuDNN / Transformer Engine backends slot in
#: here (a row + a module of hooks); none exists yet because none can be tested here.
KERNEL_BACKENDS: tuple[KernelBackend, ...] = (
    KernelBackend(
        "triton",
        "indexcache_train.ops.backend_triton",
        "our Triton kernels for all five operators (cuDNN SDPA for plain causal dense attention)",
    ),
)
MODES: tuple[str, ...] = ("auto", "torch", *(b.name for b in KERNEL_BACKENDS))


@dataclass(frozen=True)
class ModelFacts:
    """What config validation knows about the operators' inputs before any tensor exists."""

    index_head_dim: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_head_dim: int
    v_head_dim: int
    attention: frozenset[str]  # the recipe's stage forms: "dense" (warm-up) / "sparse"
    dtype: str = "bfloat16"  # the activations' dtype: "bfloat16" (optim.bf16) or "float32"


class KernelUnavailableError(RuntimeError):
    """``model.kernel_backend`` names a backend that cannot run this operator call."""


_LOGGED: set[tuple[str, str, str]] = set()


def check_mode(mode: str) -> None:
    """Raise ``ValueError`` naming the choices unless ``mode`` is one of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"kernel backend {mode!r} unknown; use one of {MODES}")


def _entry(name: str) -> KernelBackend:
    return next(b for b in KERNEL_BACKENDS if b.name == name)


def _load(entry: KernelBackend) -> ModuleType | Declined:
    try:
        return importlib.import_module(entry.module)
    except ImportError as e:
        return Declined(f"{entry.module} cannot be imported ({e})")


def _hook(entry: KernelBackend, op: str) -> Callable[..., Any] | Declined:
    module = _load(entry)
    if isinstance(module, Declined):
        return module
    hook = getattr(module, op, None)
    return hook if hook is not None else Declined(f"it has no {op} kernel")


def _insist_error(mode: str, op: str, reason: str) -> KernelUnavailableError:
    return KernelUnavailableError(
        f"model.kernel_backend={mode!r} but the {mode} backend cannot run {op} here: {reason}. "
        "Set model.kernel_backend=auto (the PyTorch reference where no kernel applies) or torch."
    )


def _log_once(name: str, op: str, reason: str) -> None:
    key = (name, op, reason)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("kernel backend %s declined %s (%s); trying the next one", name, op, reason)


def dispatch(op: str, mode: str, reference: Callable[..., T], **inputs: Any) -> T:
    """Run operator ``op`` on the first backend ``mode`` allows that takes ``inputs``.

    Args:
        op: one of :data:`OPERATORS`.
        mode: ``model.kernel_backend`` (one of :data:`MODES`).
        reference: the PyTorch reference; called with ``**inputs`` (bind its own settings, e.g.
            its chunk size, beforehand).
        **inputs: the operator's inputs, passed to each hook as keyword arguments.

    Returns:
        What the accepting hook (or the reference) returns.

    Raises:
        ValueError: ``mode`` is unknown.
        KernelUnavailableError: ``mode`` names a backend that declines the call.
    """
    check_mode(mode)
    if mode == "torch":
        return reference(**inputs)
    entries = KERNEL_BACKENDS if mode == "auto" else (_entry(mode),)
    for entry in entries:
        hook = _hook(entry, op)
        out = hook if isinstance(hook, Declined) else hook(**inputs)
        if not isinstance(out, Declined):
            return out
        if mode != "auto":
            raise _insist_error(mode, op, out.reason)
        _log_once(entry.name, op, out.reason)
    return reference(**inputs)


def model_declines(mode: str, facts: ModelFacts) -> list[str]:
    """Why backend ``mode`` cannot run a model with these facts (empty: it can, or ``mode`` is
    ``auto`` / ``torch``, which always run). The backend module's ``model_declines(facts)``
    applies the same rules its hooks apply to tensors."""
    check_mode(mode)
    if mode in ("auto", "torch"):
        return []
    entry = _entry(mode)
    module = _load(entry)
    if isinstance(module, Declined):
        return [module.reason]
    return list(module.model_declines(facts))
