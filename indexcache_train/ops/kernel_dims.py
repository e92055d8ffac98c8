"""Which head dims and input dtype the Triton kernels take: the rules in one place, no Triton.

Triton block shapes are powers of two and tensor-core tiles want >= 16 elements per dim, so each
kernel takes only some head dims (MLA's real ones all fit: 576 = 512 + 64, 192 = 128 + 64, 128).
The kernels check them before launching, and the triton backend's hooks
(:mod:`indexcache_train.ops.backend_triton`) decline with them: ``kernel_backend=auto`` then runs
PyTorch, and config validation refuses ``kernel_backend=triton`` for a model the kernels cannot
run (before anything is built).
Every function returns ``None`` when the dims fit, else the reason as a sentence.
"""

from __future__ import annotations


def is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def split_pow2(dim: int) -> tuple[int, int]:
    """Split a head dim into two power-of-two parts ``(a, b)`` with ``a + b == dim``, ``b < a``.

    Triton block shapes must be powers of two; MLA's dims are sums of two (192 = 128 + 64,
    576 = 512 + 64, 256 = 256 + 0), so each is loaded as two tiles and the dots are summed
    instead of padding to the next power of two (which would waste up to a third of the FLOPs).
    """
    a = 1 << (dim.bit_length() - 1)
    b = dim - a
    if b & (b - 1):
        raise ValueError(f"head dim {dim} is not a sum of two powers of two")
    return a, b


def _two_tiles(dim: int, what: str, min_a: int = 16) -> str | None:
    try:
        a, b = split_pow2(dim)
    except ValueError as e:
        return f"{what}: {e}"
    if a < min_a or (b and b < 16):
        return f"{what} {dim} = {a} + {b}: each power-of-two part must be >= 16 (a >= {min_a})"
    return None


def indexer_dims(head_dim: int) -> str | None:
    """Indexer top-k scoring (and the indexer side of the distillation kernels)."""
    if not is_pow2(head_dim) or head_dim < 16:
        return f"indexer head dim {head_dim} must be a power of two >= 16"
    return None


def sparse_mla_dims(qk_dim: int, v_dim: int) -> str | None:
    """Absorbed sparse MLA: ``qk_dim = kv_lora_rank + qk_rope_head_dim``, ``v_dim = kv_lora_rank``."""
    what = "sparse MLA qk dim (kv_lora_rank + qk_rope_head_dim)"
    try:
        a, b = split_pow2(qk_dim)
    except ValueError as e:
        return f"{what}: {e}"
    if a < 32 or b < 16:
        return f"{what} {qk_dim} = {a} + {b}: needs kv_lora_rank >= 32 and qk_rope_head_dim >= 16"
    if v_dim != a:
        return (
            f"sparse MLA needs kv_lora_rank ({v_dim}) to be the power-of-two part of "
            f"kv_lora_rank + qk_rope_head_dim ({qk_dim})"
        )
    return None


def dense_attention_dims(qk_dim: int, v_dim: int) -> str | None:
    """The Triton flash kernel (cuDNN, tried first where it applies, has its own rules)."""
    if not is_pow2(v_dim) or v_dim < 16:
        return f"dense attention value head dim {v_dim} must be a power of two >= 16"
    return _two_tiles(qk_dim, "dense attention qk head dim")


def distill_dims(attn_qk_dim: int, idx_head_dim: int, idx_scale: float) -> str | None:
    """The fused distillation terms (sparse and dense)."""
    if idx_scale <= 0:
        return "the distillation kernels fold the indexer scale into relu(): it must be > 0"
    return indexer_dims(idx_head_dim) or _two_tiles(attn_qk_dim, "attention qk dim")


#: The activation dtype the kernels are built, tuned and GPU-tested for. Their tiles are sized
#: for 2-byte elements (fp32 inputs overflowed shared memory: 250 KB asked, 227 KB on an H100,
#: in #24's fp32 evaluation), and ``tl.dot`` on fp32 would run TF32, not the fp32 an fp32 run
#: asks for: float32 runs the PyTorch reference.
KERNEL_DTYPE = "bfloat16"


def dtype_reason(dtype_name: str) -> str | None:
    """``None`` for bf16 inputs; else why the kernels decline (``dtype_name``: e.g. ``float32``)."""
    name = dtype_name.removeprefix("torch.")
    if name == KERNEL_DTYPE:
        return None
    return (
        f"inputs are {name}; the Triton kernels take {KERNEL_DTYPE} "
        "(float32 runs the PyTorch reference: exact fp32, no TF32)"
    )
