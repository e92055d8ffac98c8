"""Rotary position embeddings for MLA and the lightning indexer (HF semantics, explicit positions).

Positions are always passed in explicitly (``position_ids_BS``), so packed documents (positions
restart per document) and context parallelism (each rank holds a zigzag slice of positions) need
nothing special here. Two layouts of the rotary slice:

* interleaved pairs ``(x0, x1), (x2, x3), ...`` (GLM MLA and indexer, DeepSeek MLA); the output is
  written de-interleaved (``[evens | odds]``) exactly as HF's ``apply_rotary_pos_emb_interleave``
  does. Queries and keys get the same permutation, so dot products are unchanged.
* half-split ``[x_first_half | x_second_half]`` with ``rotate_half`` (DeepSeek-V3.2 indexer).
"""

from __future__ import annotations

import math

import torch

from indexcache_train.model.config import RopeConfig


def inv_freq_and_scaling(
    rope: RopeConfig, dim: int, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[dim/2]`` and the cos/sin scaling (yarn ``attention_factor``)."""
    base = rope.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    # YaRN, following transformers 5.17 ``_compute_yarn_parameters`` line by line.
    factor = (
        rope.factor
        if rope.factor is not None
        else (
            max_position_embeddings / rope.original_max_position_embeddings  # type: ignore[operator]
        )
    )

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(
                get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
            )
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1
    orig = rope.original_max_position_embeddings

    def correction_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))  # type: ignore[operator]

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (
        1.0 / pos_freqs
    ) * extrapolation
    return inv_freq, attention_factor


class RotaryTables(torch.nn.Module):
    """Holds inverse frequencies; returns ``cos``/``sin`` ``[B, S, dim/2]`` for given positions."""

    def __init__(self, rope: RopeConfig, dim: int, max_position_embeddings: int) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = inv_freq_and_scaling(rope, dim, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self, position_ids_BS: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 angles regardless of the activation dtype (bf16 loses positions past ~256).
        freqs_BSF = position_ids_BS.float()[..., None] * self.inv_freq.to(position_ids_BS.device)
        cos = (freqs_BSF.cos() * self.attention_scaling).to(dtype)
        sin = (freqs_BSF.sin() * self.attention_scaling).to(dtype)
        return cos, sin


def apply_rope(
    x: torch.Tensor, cos_BSF: torch.Tensor, sin_BSF: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """Rotate ``x`` ``[B, S, ..., dim]`` (any number of head dims between S and dim)."""
    extra = x.dim() - 3
    cos = cos_BSF.reshape(*cos_BSF.shape[:2], *([1] * extra), cos_BSF.shape[-1])
    sin = sin_BSF.reshape(*sin_BSF.shape[:2], *([1] * extra), sin_BSF.shape[-1])
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
