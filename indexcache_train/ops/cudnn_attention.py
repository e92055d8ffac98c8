"""Plain causal attention with LSE through torch's cuDNN SDPA backend (MLA's qk != v head dims).

``torch.ops.aten._scaled_dot_product_cudnn_attention(..., compute_log_sumexp=True)`` returns the
output and the per-head log-sum-exp ``[B, H, S, 1]`` (fp32, natural log of the scaled logits, the
same convention as the reference) and has a registered backward, so autograd gives dQ, dK, dV
through cuDNN too. It ran at ~500 TFLOP/s for qk 192 / v 128 on the lent H100 (perf-anchors.md),
faster than our Triton kernel, so it is used wherever it applies: no KeyRange (plain causal,
``S == T``). Packed documents and context-parallel offsets go to the Triton kernel.

Whether cuDNN takes a head-dim pair (e.g. qk 256 / v 256, forward *and* backward) depends on the
cuDNN build; :func:`cudnn_supported` runs one tiny forward + backward per ``(D, V, dtype, device)``
and caches the answer, so an unsupported pair falls back to Triton instead of failing later in the
backward pass.
"""

from __future__ import annotations

import torch

_PROBED: dict[tuple[int, int, torch.dtype, int], bool] = {}


def _cudnn_call(q_BSHD, k_BSHD, v_BSHV, scale):
    # BSHD -> BHSD views (no copy): cuDNN takes arbitrary strides.
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q_BSHD.transpose(1, 2),
        k_BSHD.transpose(1, 2),
        v_BSHV.transpose(1, 2),
        None,
        True,  # compute_log_sumexp
        0.0,  # dropout_p
        True,  # is_causal
        False,  # return_debug_mask
        scale=scale,
    )
    return out[0], out[1]


def cudnn_supported(q_BSHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHV: torch.Tensor) -> bool:
    """True if the cuDNN path runs forward and backward for these head dims on this device."""
    if not q_BSHD.is_cuda or q_BSHD.dtype not in (torch.bfloat16, torch.float16):
        return False
    if q_BSHD.shape[1] != k_BTHD.shape[1] or q_BSHD.shape[2] != k_BTHD.shape[2]:
        return False
    D, V = q_BSHD.shape[-1], v_BTHV.shape[-1]
    key = (D, V, q_BSHD.dtype, q_BSHD.device.index or 0)
    if key not in _PROBED:
        _PROBED[key] = _probe(D, V, q_BSHD.dtype, q_BSHD.device)
    return _PROBED[key]


def _probe(D: int, V: int, dtype: torch.dtype, device: torch.device) -> bool:
    try:
        with torch.enable_grad():
            g = torch.Generator(device=device).manual_seed(0)
            q, k = (
                torch.randn(1, 256, 2, D, device=device, dtype=dtype, generator=g) for _ in "qk"
            )
            v = torch.randn(1, 256, 2, V, device=device, dtype=dtype, generator=g)
            q.requires_grad_()
            out, lse = _cudnn_call(q, k.requires_grad_(), v.requires_grad_(), D**-0.5)
            out.float().square().sum().backward()
            torch.cuda.synchronize(device)
        return bool(torch.isfinite(lse).all()) and q.grad is not None
    except RuntimeError:
        return False


def dense_attention_cudnn(
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHV: torch.Tensor,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention ``(out_BSHV, lse_BSH)`` (``S == T``, no KeyRange) through cuDNN."""
    B, S, H, _ = q_BSHD.shape
    out_BHSV, lse_BHS1 = _cudnn_call(q_BSHD, k_BSHD, v_BSHV, softmax_scale)
    out_BSHV = out_BHSV.transpose(1, 2)
    lse_BSH = lse_BHS1.detach().reshape(B, H, S).transpose(1, 2).float().contiguous()
    return out_BSHV, lse_BSH
