"""Top-k recall of the keys a layer attends against its own attention (evaluation metric).

For layer j and query row t: ``A_t`` = the ``k_t = min(index_topk, #valid keys)`` keys with the
largest head-summed attention probability of layer j over *all* valid keys (not only the ones it
attends), and ``R_t`` = the top-k set layer j actually uses (a Shared layer: its source's; a Full
layer: its own). ``recall_t = |A_t ∩ R_t| / k_t``; rows without a valid key are skipped. Rows with
``#valid <= index_topk`` score 1 by construction (the selection holds every valid key).

A Shared layer's recall measures how well the reused indices fit it, which is what the
multi-layer distillation loss optimises for (IndexCache, arXiv 2603.12201, section 3.2).

Computed one query chunk at a time: the largest temporary is ``[B, C, H, T]`` (a chunk of rows
against every key); no ``[S, T]`` tensor is built. Pure torch.

Shape legend: B batch, S query rows, C rows of one chunk, T keys, H heads, D head dim, K slots.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from indexcache_train.ops.masking import KeyRange, acc, chunks

ProbsFn = Callable[[int, int], torch.Tensor]


@torch.no_grad()
def head_sum_probs_all_keys(
    q_BCHD: torch.Tensor, kv_BTD: torch.Tensor, valid_BCT: torch.Tensor, softmax_scale: float
) -> torch.Tensor:
    """``sum_h softmax_T(q_h . kv)`` over every valid key (absorbed MLA layout: one shared latent
    key per position), ``[B, C, T]``; all zeros on a row without a valid key."""
    s_BCHT = torch.einsum("bchd,btd->bcht", acc(q_BCHD), acc(kv_BTD)) * softmax_scale
    s_BCHT = s_BCHT.masked_fill(~valid_BCT[:, :, None, :], float("-inf"))
    return torch.softmax(s_BCHT, dim=-1).nan_to_num(0.0).sum(2)


def _reused_mask(reused_BCK: torch.Tensor, num_keys: int) -> torch.Tensor:
    """``[B, C, T]`` bool: key t is in the row's reused set (``-1`` slots dropped)."""
    idx = reused_BCK.long()
    idx = torch.where(idx >= 0, idx, num_keys)  # empty slots land in a spare column
    mask = torch.zeros(*idx.shape[:2], num_keys + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, idx, True)
    return mask[..., :num_keys]


@torch.no_grad()
def topk_recall(
    probs_fn: ProbsFn,
    key_range: KeyRange,
    reused_BSK: torch.Tensor,
    topk: int,
    num_keys: int,
    chunk: int = 128,
) -> torch.Tensor:
    """``[sum over rows of recall_t, number of rows with a valid key]`` (float64, so micro-batches
    and ranks can be summed before dividing).

    Args:
        probs_fn: ``probs_fn(s0, s1)`` -> the layer's head-summed attention probabilities of
            rows ``s0:s1`` over all ``num_keys`` keys, ``[B, s1-s0, T]`` (any positive scaling
            per row is fine: only the ranking is used).
        key_range: the rows' valid key ranges.
        reused_BSK: the top-k indices the layer uses (``-1`` = empty slot).
        topk: the model's ``index_topk``.
    """
    out = torch.zeros(2, dtype=torch.float64, device=reused_BSK.device)
    k = min(topk, num_keys)
    for s0, s1 in chunks(reused_BSK.shape[1], chunk):
        rows = key_range.rows(s0, s1)
        valid_BCT = rows.dense_mask(num_keys)
        scores_BCT = probs_fn(s0, s1).float().masked_fill(~valid_BCT, float("-inf"))
        own_BCK = scores_BCT.topk(k, dim=-1).indices
        k_BC = rows.num_valid().clamp(max=k)
        slot_ok_BCK = torch.arange(k, device=own_BCK.device) < k_BC[..., None]
        hits_BC = (
            _reused_mask(reused_BSK[:, s0:s1], num_keys).gather(-1, own_BCK) & slot_ok_BCK
        ).sum(-1)
        has_key_BC = k_BC > 0
        out[0] += (hits_BC[has_key_BC].double() / k_BC[has_key_BC].double()).sum()
        out[1] += has_key_BC.sum()
    return out
