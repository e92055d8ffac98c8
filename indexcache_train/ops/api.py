"""The operator API: indexer top-k, dense attention, sparse MLA and the two distillation terms.

Every function is keyword-only and dispatches through the kernel-backend table
(:mod:`~indexcache_train.ops.backends`): ``backend`` is ``model.kernel_backend`` (``auto``: the
first kernel that takes the inputs, else the PyTorch reference; ``torch``: the reference;
``triton``: that backend or
:class:`~indexcache_train.ops.backends.KernelUnavailableError`). The model reads the choice
from its config, never from a global. ``chunk`` is the reference's query-row chunk (its memory
bound); kernels choose their own tiling.
"""

from __future__ import annotations

from functools import partial

import torch

from indexcache_train.ops import flop_counter
from indexcache_train.ops.backends import dispatch
from indexcache_train.ops.dense_attention_reference import dense_attention_reference
from indexcache_train.ops.distill_reference import (
    dense_distill_reference,
    sparse_distill_reference,
)
from indexcache_train.ops.indexer_reference import indexer_topk_reference
from indexcache_train.ops.masking import KeyRange
from indexcache_train.ops.row_split import RowSplit
from indexcache_train.ops.sparse_mla_reference import sparse_mla_reference


def indexer_topk(
    *,
    q_BSID: torch.Tensor,
    k_BTD: torch.Tensor,
    w_BSI: torch.Tensor,
    topk: int,
    softmax_scale: float,
    key_range: KeyRange | None = None,
    backend: str = "auto",
    chunk: int = 256,
) -> torch.Tensor:
    """Top-k key indices ``[B, S, min(topk, T)]`` int32 of the indexer logits (``-1``: empty).

    Args:
        q_BSID: indexer queries; k_BTD: indexer keys (whole sequence, key order);
            w_BSI: per-head weights; softmax_scale: scale inside ``relu``.
        topk: slots per query row; key_range: causal / document / CP limits (causal if None).
    """
    flop_counter.add("indexer_topk", lambda: 2.0 * k_BTD.shape[1] * q_BSID.numel())
    return dispatch(
        "indexer_topk", backend, partial(indexer_topk_reference, chunk=chunk),
        q_BSID=q_BSID, k_BTD=k_BTD, w_BSI=w_BSI, topk=topk, softmax_scale=softmax_scale,
        key_range=key_range,
    )  # fmt: skip


def dense_attention(
    *,
    q_BSHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHV: torch.Tensor,
    softmax_scale: float,
    key_range: KeyRange | None = None,
    backend: str = "auto",
    chunk: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention with per-head LSE: ``(out_BSHV, lse_BSH)`` (causal if no range)."""
    return dispatch(
        "dense_attention", backend, partial(dense_attention_reference, chunk=chunk),
        q_BSHD=q_BSHD, k_BTHD=k_BTHD, v_BTHV=v_BTHV, softmax_scale=softmax_scale,
        key_range=key_range,
    )  # fmt: skip


def sparse_mla(
    *,
    q_BSHD: torch.Tensor,
    kv_BTD: torch.Tensor,
    topk_BSK: torch.Tensor,
    softmax_scale: float,
    v_dim: int,
    deterministic: bool = False,
    backend: str = "auto",
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse absorbed-MLA attention over top-k indices: ``(out_BSHV, lse_BSH)``.

    ``kv_BTD`` is the shared latent key ``[c_kv | k_rope]``; its first ``v_dim`` dims are the
    value (``v_dim = kv_lora_rank``). ``deterministic``: bitwise run-to-run reproducible
    gradients (no fp32 atomics in the key-gradient reduction).
    """
    return dispatch(
        "sparse_mla", backend, partial(sparse_mla_reference, chunk=chunk),
        q_BSHD=q_BSHD, kv_BTD=kv_BTD, topk_BSK=topk_BSK, softmax_scale=softmax_scale, v_dim=v_dim,
        deterministic=deterministic,
    )  # fmt: skip


def sparse_distill(
    *,
    attn_q_BSHD: torch.Tensor,
    attn_kv_BTD: torch.Tensor,
    attn_lse_BSH: torch.Tensor,
    topk_BSK: torch.Tensor,
    attn_scale: float,
    idx_q_BSID: torch.Tensor,
    idx_k_BTD: torch.Tensor,
    idx_w_BSI: torch.Tensor,
    idx_scale: float,
    split: RowSplit | None = None,
    backend: str = "auto",
    chunk: int = 128,
) -> torch.Tensor:
    """Sparse-stage distillation term ``sum_s KL(p_s || q_s)`` over the top-k slots, summed over
    this rank's query rows.

    Args:
        attn_q_BSHD, attn_kv_BTD, attn_lse_BSH, attn_scale: the layer's absorbed attention (this
            rank's heads, every row; detached: the target gets no gradient).
        topk_BSK: the share group's top-k indices of every row (the key set of p and q).
        idx_q_BSID, idx_k_BTD, idx_w_BSI, idx_scale: the source Full layer's indexer: q and w of
            this rank's rows, k of every key.
        split: how rows and heads are split over the tensor-parallel group
            (:class:`~indexcache_train.ops.row_split.RowSplit`; None: one rank, all heads).

    Returns:
        fp32 scalar; gradients flow into the indexer's q, k and w only.
    """
    split = split or RowSplit()
    _count_distill(attn_q_BSHD, topk_BSK.shape[-1], idx_q_BSID)
    return dispatch(
        "sparse_distill", backend, partial(sparse_distill_reference, chunk=chunk),
        attn_q_BSHD=attn_q_BSHD, attn_kv_BTD=attn_kv_BTD, attn_lse_BSH=attn_lse_BSH,
        topk_BSK=topk_BSK, attn_scale=attn_scale, idx_q_BSID=idx_q_BSID, idx_k_BTD=idx_k_BTD,
        idx_w_BSI=idx_w_BSI, idx_scale=idx_scale, split=split,
    )  # fmt: skip


def dense_distill(
    *,
    attn_q_BSHD: torch.Tensor,
    attn_k_BTHD: torch.Tensor,
    attn_lse_BSH: torch.Tensor,
    key_range: KeyRange | None,
    attn_scale: float,
    idx_q_BSID: torch.Tensor,
    idx_k_BTD: torch.Tensor,
    idx_w_BSI: torch.Tensor,
    idx_scale: float,
    split: RowSplit | None = None,
    backend: str = "auto",
    chunk: int = 128,
) -> torch.Tensor:
    """Dense warm-up distillation term over every key of each row's ``key_range`` (every row;
    causal if None); the expanded attention layout (per-head keys), otherwise as
    :func:`sparse_distill`."""
    B, S = attn_q_BSHD.shape[:2]
    split = split or RowSplit()
    _count_distill(attn_q_BSHD, attn_k_BTHD.shape[1], idx_q_BSID)
    return dispatch(
        "dense_distill", backend, partial(dense_distill_reference, chunk=chunk),
        attn_q_BSHD=attn_q_BSHD, attn_k_BTHD=attn_k_BTHD, attn_lse_BSH=attn_lse_BSH,
        key_range=key_range or KeyRange.causal(B, S, attn_q_BSHD.device), attn_scale=attn_scale,
        idx_q_BSID=idx_q_BSID, idx_k_BTD=idx_k_BTD, idx_w_BSI=idx_w_BSI, idx_scale=idx_scale,
        split=split,
    )  # fmt: skip


def _count_distill(attn_q_BSHD: torch.Tensor, keys: int, idx_q_BSID: torch.Tensor) -> None:
    """Nominal FLOPs (:mod:`~indexcache_train.ops.flop_counter`): the target's head sums over
    every row for this rank's heads, the indexer's logits (and their two gradient products)
    over this rank's rows; ``keys`` per row (all keys dense, the top-k slots sparse)."""
    B, S, H, Da = attn_q_BSHD.shape
    _, n, NI, D = idx_q_BSID.shape
    grads = 3 if torch.is_grad_enabled() and idx_q_BSID.requires_grad else 1
    flop_counter.add("distill_target", lambda: 2.0 * B * S * keys * H * Da)
    flop_counter.add("distill_kl", lambda: 2.0 * B * n * keys * NI * D * grads)
