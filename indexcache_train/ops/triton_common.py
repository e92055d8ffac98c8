"""Helpers shared by the Triton kernels (interpreter switch, dot wrapper, head-dim split).

Triton 3.6's CPU interpreter (``TRITON_INTERPRET=1``) computes ``tl.dot`` on bf16 operands from
their raw bit patterns (errors of 1e10 on a 16x16 product, seen here); every kernel therefore
goes through :func:`mma`, which upcasts to fp32 only when ``INTERPRET`` is set, so the compiled
GPU kernels still issue bf16 tensor-core instructions with fp32 accumulation.

The same interpreter turns a scalar into ``int`` with ``int(ndarray)``, which numpy >= 2.x refuses
for the 1-element arrays its reductions and scalar loads produce ("only 0-dimensional arrays can
be converted"), so a loop bound computed at run time (``range(lo, hi, BLOCK)``) fails there.
:func:`_patch_interpreter` swaps in ``.reshape(-1)[0]`` for that one conversion; it runs only
when ``TRITON_INTERPRET=1`` and touches nothing on the GPU path.

Its fp32 -> bf16 conversion also truncates (mean relative bias -0.28% on randn, measured here),
where the GPU's ``cvt.rn`` rounds to nearest even; :func:`cast` rounds the bits itself under the
interpreter so the CPU tests see the GPU's rounding.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_interpreter() -> None:
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_indexcache_patched", False):
        return

    def patched(tensor, scope) -> None:  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(
            tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0])
        )

    patched._indexcache_patched = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _patch_interpreter()

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def mma(a, b, INTERP: tl.constexpr):
    """``a @ b`` with fp32 accumulation (bf16 tensor cores on GPU, fp32 in the interpreter)."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def cast(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """``x.to(dtype)``, rounding to nearest even for bf16 also under the interpreter."""
    if INTERP and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # RNE on the dropped 16 bits
        return bits.to(tl.float32, bitcast=True).to(dtype)  # exact: low bits are zero
    else:
        return x.to(dtype)
