"""Sequence-chunked LM head + cross-entropy: the logits of a whole sequence never exist at once.

Megatron-Core 0.19.2's post-process runs the output layer over the whole sequence and the
vocab-parallel cross-entropy in fp32: ``4 * V / tp`` bytes per token for the logits, as much again
for their softmax / gradient, e.g. 201 KB per token with V = 50304 (26 GiB at 128K tokens) -- the
largest per-token activation of a long-context step once the layers are recomputed
(docs/benchmarks.md, issue #12). :func:`chunked_lm_loss` is Megatron's ``output_processor`` hook:
each chunk of ``chunk_tokens`` positions runs Megatron's own output layer and
``compute_language_model_loss`` under activation checkpointing, so forward and backward hold one
chunk's logits at a time and recompute them per chunk in the backward. Per-token losses are the
same operations on the same rows, so they equal the unchunked ones.

Sequence parallelism: the hidden states arrive as this rank's ``S / tp`` rows and the output
layer all-gathers them over TP, so a chunk of ``c`` local rows becomes ``tp * c`` rows at
positions ``r * S/tp + [c0, c0 + c)`` of every TP rank ``r``; labels are gathered and losses
scattered at exactly those positions. MTP logits (Megatron's ``process_mtp_loss``) are not
chunked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def chunk_positions(seq: int, local_rows: int, start: int, stop: int) -> torch.Tensor:
    """Sequence positions of local rows ``[start, stop)`` after the output layer's TP gather."""
    ranks = seq // local_rows
    rows = torch.arange(start, stop)
    return torch.cat([r * local_rows + rows for r in range(ranks)])


def chunked_lm_loss(chunk_tokens: int) -> Callable[..., torch.Tensor]:
    """An ``output_processor`` for ``GPTModel.forward`` returning the per-token loss ``[B, S]``."""
    if chunk_tokens <= 0:
        raise ValueError(f"lm loss chunk must be > 0 tokens, got {chunk_tokens}")

    def processor(
        *,
        hidden_states: torch.Tensor,
        output_layer: torch.nn.Module,
        output_weight: torch.Tensor | None,
        labels: torch.Tensor | None,
        compute_language_model_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        scale_logits: Callable[[torch.Tensor], torch.Tensor],
        runtime_gather_output: bool | None = None,
        **_: Any,
    ) -> torch.Tensor:
        if labels is None:
            raise ValueError("chunked_lm_loss computes the loss: call the model with labels")
        local_rows, seq = hidden_states.shape[0], labels.shape[1]
        if seq % local_rows:
            raise ValueError(f"{seq} label positions are not a multiple of {local_rows} rows")
        # Rows per chunk on this rank: the gathered chunk has chunk_tokens rows in total.
        step = max(1, chunk_tokens // (seq // local_rows))

        def chunk_loss(h_CBH: torch.Tensor, labels_BC: torch.Tensor) -> torch.Tensor:
            logits_CBV, _ = output_layer(
                h_CBH, weight=output_weight, runtime_gather_output=runtime_gather_output
            )
            return compute_language_model_loss(labels_BC, scale_logits(logits_CBV))

        pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
        for start in range(0, local_rows, step):
            stop = min(start + step, local_rows)
            pos = chunk_positions(seq, local_rows, start, stop).to(labels.device)
            part_BC = checkpoint(
                chunk_loss, hidden_states[start:stop], labels[:, pos], use_reentrant=False
            )
            pieces.append((pos, part_BC))
        # One out-of-place scatter keeps autograd simple (no in-place writes into a leaf).
        pos_all = torch.cat([p for p, _ in pieces])
        loss_all_BS = torch.cat([v for _, v in pieces], dim=1)
        return loss_all_BS.new_zeros(labels.shape).index_copy(1, pos_all, loss_all_BS)

    return processor
