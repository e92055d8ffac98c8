"""The kernel-backend dispatcher (ops/backends.py) on CPU: fallback order, each decline reason
logged once, a named backend insisting with the reason and the fix, ``torch`` forcing the
reference, a backend whose module cannot be imported, and the real table on CPU tensors.

Fake backends are modules put into ``sys.modules`` and rows put into the table; each hook
records its calls, so the tests see which backends ran, in which order.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from indexcache_train.ops import api, backends
from indexcache_train.ops import backend_triton as bt
from indexcache_train.ops.backends import Declined, KernelBackend, KernelUnavailableError
from indexcache_train.ops.sparse_mla_reference import sparse_mla_reference

pytestmark = pytest.mark.unit

LOGGER = "indexcache_train.ops.backends"


def _fake_backend(name: str, answer: Any, calls: list[str]) -> ModuleType:
    """A backend module whose ``sparse_mla`` hook records the call and returns ``answer``."""
    module = ModuleType(f"fake_backend_{name}")

    def sparse_mla(**inputs: Any) -> Any:
        calls.append(f"{name}:{inputs['x']}")
        return answer

    module.sparse_mla = sparse_mla  # type: ignore[attr-defined]
    declines = ["no"] if isinstance(answer, Declined) else []
    module.model_declines = lambda facts: declines  # type: ignore[attr-defined]
    return module


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch):
    """Install fake backends ``(name, answer)`` in table order; returns the call log."""
    monkeypatch.setattr(backends, "_LOGGED", set())
    calls: list[str] = []

    def install(*rows: tuple[str, Any]) -> list[str]:
        entries = []
        for name, answer in rows:
            module = _fake_backend(name, answer, calls)
            monkeypatch.setitem(sys.modules, module.__name__, module)
            entries.append(KernelBackend(name, module.__name__, f"fake {name}"))
        monkeypatch.setattr(backends, "KERNEL_BACKENDS", tuple(entries))
        monkeypatch.setattr(backends, "MODES", ("auto", "torch", *(e.name for e in entries)))
        return calls

    return install


def _reference(**inputs: Any) -> str:
    return f"reference:{inputs['x']}"


def _run(mode: str, x: int = 0) -> Any:
    return backends.dispatch("sparse_mla", mode, _reference, x=x)


def _declines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_auto_takes_the_first_backend_that_accepts(table, caplog) -> None:
    calls = table(("a", Declined("a cannot")), ("b", "b ran"), ("c", "c ran"))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert _run("auto") == "b ran"
    assert calls == ["a:0", "b:0"]  # table order; c is never asked
    assert _declines(caplog) == [
        "kernel backend a declined sparse_mla (a cannot); trying the next one"
    ]


def test_auto_falls_back_to_the_reference_and_logs_each_reason_once(table, caplog) -> None:
    calls = table(("a", Declined("a cannot")), ("b", Declined("b cannot")))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert [_run("auto", x) for x in range(3)] == [f"reference:{x}" for x in range(3)]
    assert calls == ["a:0", "b:0", "a:1", "b:1", "a:2", "b:2"]
    logged = _declines(caplog)
    assert len(logged) == 2 and "a cannot" in logged[0] and "b cannot" in logged[1]


def test_a_new_reason_is_logged_again(table, caplog, monkeypatch) -> None:
    table(("a", Declined("first")))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _run("auto")
        _run("auto")
        module = sys.modules["fake_backend_a"]
        monkeypatch.setattr(module, "sparse_mla", lambda **kw: Declined("second"))
        _run("auto")
    assert ["first" in m for m in _declines(caplog)] == [True, False]


def test_a_named_backend_insists(table) -> None:
    calls = table(("a", "a ran"), ("b", Declined("head dim 40 is not a power of two")))
    assert _run("a") == "a ran"
    with pytest.raises(
        KernelUnavailableError,
        match=r"kernel_backend='b' but the b backend cannot run sparse_mla here: head dim 40 is "
        r"not a power of two\. Set model\.kernel_backend=auto .* or torch",
    ):
        _run("b")
    assert calls == ["a:0", "b:0"]  # insisting on b never runs a


def test_torch_forces_the_reference(table) -> None:
    calls = table(("a", "a ran"))
    assert _run("torch", 5) == "reference:5"
    assert calls == []


def test_unknown_mode_is_refused(table) -> None:
    table(("a", "a ran"))
    with pytest.raises(ValueError, match=r"'cuda' unknown; use one of \('auto', 'torch', 'a'\)"):
        _run("cuda")


def test_unimportable_module_and_missing_hook_decline(table, monkeypatch, caplog) -> None:
    table(("a", "a ran"))
    rows = (
        KernelBackend("gone", "indexcache_train.ops.no_such_backend", "missing module"),
        KernelBackend("a", "fake_backend_a", "fake a"),
    )
    monkeypatch.setattr(backends, "KERNEL_BACKENDS", rows)
    monkeypatch.setattr(backends, "MODES", ("auto", "torch", "gone", "a"))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert _run("auto") == "a ran"
    assert "no_such_backend cannot be imported" in _declines(caplog)[0]
    with pytest.raises(KernelUnavailableError, match="no_such_backend cannot be imported"):
        _run("gone")
    with pytest.raises(KernelUnavailableError, match="it has no dense_distill kernel"):
        backends.dispatch("dense_distill", "a", _reference, x=0)
    assert "no_such_backend cannot be imported" in backends.model_declines("gone", None)[0]


def test_model_declines_asks_only_a_named_backend(table) -> None:
    table(("a", Declined("x")))
    assert backends.model_declines("auto", None) == []
    assert backends.model_declines("torch", None) == []
    assert backends.model_declines("a", None) == ["no"]


# ----------------------------------------------------------------------------- the real table


def _sparse_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    B, S, H, D, V, K = 1, 6, 2, 48, 32, 3
    idx_SK = torch.arange(S)[:, None] - torch.arange(K)[None]  # the row's key and the 2 before
    return dict(
        q_BSHD=torch.randn(B, S, H, D, generator=g),
        kv_BTD=torch.randn(B, S, D, generator=g),
        topk_BSK=idx_SK.clamp_min(-1)[None].int(),
        softmax_scale=D**-0.5,
        v_dim=V,
    )


def test_real_table_on_cpu(monkeypatch, caplog) -> None:
    """CPU tensors: ``auto`` logs the triton decline and equals the reference; ``triton`` says
    why it cannot run and how to fix it."""
    monkeypatch.setattr(backends, "_LOGGED", set())
    x = _sparse_inputs()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out, lse = api.sparse_mla(**x, backend="auto")
    ref_out, ref_lse = sparse_mla_reference(**x)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert _declines(caplog) == [
        "kernel backend triton declined sparse_mla (inputs are on cpu; the kernels run on CUDA); "
        "trying the next one"
    ]
    with pytest.raises(KernelUnavailableError, match=r"inputs are on cpu.*kernel_backend=auto"):
        api.sparse_mla(**x, backend="triton")


def test_every_operator_has_a_triton_hook() -> None:
    assert [op for op in backends.OPERATORS if not hasattr(bt, op)] == []
    assert backends.MODES == ("auto", "torch", "triton")


def test_triton_hooks_decline_without_triton(monkeypatch) -> None:
    """A CUDA input the kernels take, on an install whose Triton does not import: a decline
    (so ``auto`` runs the reference), not an ImportError."""
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    monkeypatch.delitem(sys.modules, "indexcache_train.ops.triton_common", raising=False)
    bt.triton_missing.cache_clear()
    try:
        q = SimpleNamespace(
            is_cuda=True, device="cuda:0", dtype="torch.bfloat16", shape=(1, 8, 2, 576)
        )
        out = bt.sparse_mla(q_BSHD=q, kv_BTD=None, topk_BSK=None, softmax_scale=1.0, v_dim=512)
    finally:
        bt.triton_missing.cache_clear()
    assert isinstance(out, Declined) and out.reason.startswith("Triton cannot be imported")
