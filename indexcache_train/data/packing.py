"""Packed sequences: several documents in one row, attention never crossing a document boundary.

Our DSA attention takes a row-wise key range instead of Megatron's THD layout: query ``t`` may
attend ``[key_start[t], t]``, where ``key_start`` is the first token of its document, and RoPE uses
per-document positions. Two ways in:

* :func:`from_cu_seqlens` for callers that already have THD metadata (``cu_seqlens``); positions
  must be given explicitly and restart at 0 on every document (a silent ``arange`` would give
  every document but the first wrong RoPE phases).
* :func:`from_eod` for Megatron ``GPTDataset`` samples, whose documents are separated by EOD.

Padding (to a multiple of ``tp`` for sequence parallelism and ``2 * cp`` for context parallelism)
is a trailing pseudo-document of EOD tokens with loss mask 0: it attends only itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class PackingError(ValueError):
    """Inconsistent packed-sequence metadata (message names the field and the fix)."""


@dataclass(frozen=True)
class PackedLayout:
    """Per-token document layout of a ``[B, S]`` batch."""

    position_ids_BS: torch.Tensor
    key_start_BS: torch.Tensor


def from_cu_seqlens(
    cu_seqlens: torch.Tensor, position_ids: torch.Tensor | None, total: int | None = None
) -> PackedLayout:
    """One packed row from cumulative sequence lengths ``[0, l0, l0+l1, ..., T]``."""
    cu = cu_seqlens.long().flatten()
    if cu.numel() < 2 or cu[0] != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise PackingError("cu_seqlens must start at 0 and be non-decreasing, e.g. [0, 5, 12]")
    total = int(cu[-1]) if total is None else total
    if int(cu[-1]) != total:
        raise PackingError(
            f"cu_seqlens ends at {int(cu[-1])} but the packed row has {total} tokens"
        )
    if position_ids is None:
        raise PackingError(
            "packed sequences need explicit per-document position_ids (restarting at 0 at every "
            "cu_seqlens boundary); pass them instead of relying on arange"
        )
    pos = position_ids.long().reshape(-1)
    if pos.numel() != total:
        raise PackingError(f"position_ids has {pos.numel()} entries for {total} packed tokens")
    lengths = (cu[1:] - cu[:-1]).tolist()
    starts = torch.repeat_interleave(cu[:-1], torch.tensor(lengths))
    expected = torch.arange(total) - starts
    if not torch.equal(pos.cpu(), expected):
        bad = int((pos.cpu() != expected).nonzero()[0])
        raise PackingError(
            f"position_ids[{bad}]={int(pos[bad])} but token {bad} is position {int(expected[bad])} "
            "of its document: positions must restart at 0 at every cu_seqlens boundary"
        )
    return PackedLayout(pos.view(1, -1), starts.view(1, -1).to(pos.device))


def from_eod(tokens_BS: torch.Tensor, eod: int, num_pad: int = 0) -> PackedLayout:
    """Documents end with (and include) an EOD token; the next token starts a new document.
    The last ``num_pad`` tokens (from :func:`pad_to_multiple`) each form their own document."""
    B, S = tokens_BS.shape
    idx = torch.arange(S, device=tokens_BS.device).expand(B, S)
    is_start = torch.zeros_like(tokens_BS, dtype=torch.bool)
    is_start[:, 0] = True
    is_start[:, 1:] = tokens_BS[:, :-1] == eod
    if num_pad:
        is_start[:, S - num_pad :] = True
    key_start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return PackedLayout(idx - key_start, key_start)


def pad_to_multiple(tokens_BS: torch.Tensor, multiple: int, eod: int) -> tuple[torch.Tensor, int]:
    """Right-pad with EOD so ``S`` divides ``multiple``; returns the padded tokens and pad count."""
    pad = (-tokens_BS.shape[1]) % multiple
    if pad == 0:
        return tokens_BS, 0
    filler = torch.full(
        (tokens_BS.shape[0], pad), eod, dtype=tokens_BS.dtype, device=tokens_BS.device
    )
    return torch.cat([tokens_BS, filler], dim=1), pad
