"""One served layer's distillation term: KL(p^(j) || q^(l)) summed over this rank's query rows.

``p^(j)``: layer j's main attention, summed over *all* heads and L1-normalised. Each tensor-
parallel rank holds a slice of the heads for every row; under sequence parallelism it computes
the term for its own slice of the rows (:class:`~indexcache_train.ops.row_split.RowSplit`): its
partial head sums for every slice's rows are reduced onto the slices' owners. The indexer
gradients are then per-rank partials that Megatron sums over TP (the indexer parameters carry
the ``sequence_parallel`` tag); without sequence parallelism every rank computes every row and
Megatron averages. ``q^(l)``: softmax of the Full layer l's indexer logits on the same key set.
"""

from __future__ import annotations

import torch

from indexcache_train.loss.kl import dense_kl_sum, sparse_kl_sum
from indexcache_train.loss.targets import head_sum_probs_dense, head_sum_probs_topk, l1_normalize
from indexcache_train.ops import flop_counter
from indexcache_train.ops.masking import KeyRange, chunks
from indexcache_train.ops.row_split import RowSplit


def _use_distill_kernel(
    backend: str, attn_q_BSHD: torch.Tensor, idx_q_BSID: torch.Tensor, idx_scale: float
) -> bool:
    """Dispatch as in :mod:`indexcache_train.ops.api`: ``"auto"`` runs the fused Triton kernels
    (:mod:`indexcache_train.ops.triton_distill`) on CUDA inputs they take, ``"torch"`` this
    module's chunked path, ``"triton"`` the kernels or an error."""
    if backend == "auto" and not idx_q_BSID.is_cuda:
        return False
    from indexcache_train.ops import kernel_dims, kernels
    from indexcache_train.ops.api import _use_kernel

    why_not = kernel_dims.distill_dims(attn_q_BSHD.shape[-1], idx_q_BSID.shape[-1], idx_scale)
    return _use_kernel(backend, idx_q_BSID, kernels.HAVE_DISTILL, "distillation loss", why_not)  # type: ignore[arg-type]


def sparse_term(
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
    chunk: int = 128,
    backend: str = "auto",
) -> torch.Tensor:
    """Sparse stage: p and q over the group's shared top-k set (absorbed attention layout).

    Attention tensors and ``topk_BSK`` hold every row for this rank's heads; the indexer's q and
    w this rank's rows (``split``'s slice); the result sums this rank's rows."""
    split = split or RowSplit()
    n = idx_q_BSID.shape[1]
    _count("sparse", attn_q_BSHD, topk_BSK.shape[-1], idx_q_BSID, split)
    if _use_distill_kernel(backend, attn_q_BSHD, idx_q_BSID, idx_scale):
        from indexcache_train.ops import kernels

        return kernels.sparse_distill(
            attn_q_BSHD.detach(), attn_kv_BTD.detach(), attn_lse_BSH.detach(), topk_BSK,
            attn_scale, idx_q_BSID, idx_k_BTD, idx_w_BSI, idx_scale, split,
        )  # fmt: skip
    q, kv, lse = attn_q_BSHD.detach(), attn_kv_BTD.detach(), attn_lse_BSH.detach()

    def partial(a0: int, a1: int) -> torch.Tensor:
        return head_sum_probs_topk(q[:, a0:a1], kv, lse[:, a0:a1], topk_BSK[:, a0:a1], attn_scale)

    p_BSK = torch.cat(
        [l1_normalize(split.reduced_rows(partial, s0, s1, n)) for s0, s1 in chunks(n, chunk)], 1
    )
    own_topk = split.own(topk_BSK) if split.slices > 1 else topk_BSK
    return sparse_kl_sum(p_BSK, own_topk, idx_q_BSID, idx_k_BTD, idx_w_BSI, idx_scale, chunk)


def dense_term(
    attn_q_BSHD: torch.Tensor,
    attn_k_BTHD: torch.Tensor,
    attn_lse_BSH: torch.Tensor,
    key_range: KeyRange,
    attn_scale: float,
    idx_q_BSID: torch.Tensor,
    idx_k_BTD: torch.Tensor,
    idx_w_BSI: torch.Tensor,
    idx_scale: float,
    split: RowSplit | None = None,
    chunk: int = 128,
    backend: str = "auto",
) -> torch.Tensor:
    """Dense warm-up: p and q over every valid (causal / same-document) key, one chunk at a time.

    Rows as for :func:`sparse_term`; ``key_range`` covers every row."""
    split = split or RowSplit()
    n = idx_q_BSID.shape[1]
    _count("dense", attn_q_BSHD, attn_k_BTHD.shape[1], idx_q_BSID, split)
    if _use_distill_kernel(backend, attn_q_BSHD, idx_q_BSID, idx_scale):
        from indexcache_train.ops import kernels

        return kernels.dense_distill(
            attn_q_BSHD.detach(), attn_k_BTHD.detach(), attn_lse_BSH.detach(), key_range,
            attn_scale, idx_q_BSID, idx_k_BTD, idx_w_BSI, idx_scale, split,
        )  # fmt: skip
    q, k, lse = attn_q_BSHD.detach(), attn_k_BTHD.detach(), attn_lse_BSH.detach()
    T = k.shape[1]

    def partial(a0: int, a1: int) -> torch.Tensor:
        valid = key_range.rows(a0, a1).dense_mask(T)
        return head_sum_probs_dense(q[:, a0:a1], k, lse[:, a0:a1], valid, attn_scale)

    def target(s0: int, s1: int) -> torch.Tensor:
        return l1_normalize(split.reduced_rows(partial, s0, s1, n))

    own_range = key_range.rows(split.rank * n, split.rank * n + n)
    return dense_kl_sum(target, own_range, idx_q_BSID, idx_k_BTD, idx_w_BSI, idx_scale, chunk)


def _count(
    form: str, attn_q_BSHD: torch.Tensor, keys: int, idx_q_BSID: torch.Tensor, split: RowSplit
) -> None:
    """Nominal FLOPs (:mod:`indexcache_train.ops.flop_counter`): the target's head sums over
    every row for this rank's heads, the indexer's logits (and their two gradient products)
    over this rank's rows; ``keys`` per row (all keys dense, the top-k slots sparse)."""
    B, S, H, Da = attn_q_BSHD.shape
    _, n, NI, D = idx_q_BSID.shape
    grads = 3 if torch.is_grad_enabled() and idx_q_BSID.requires_grad else 1
    flop_counter.add("distill_target", lambda: 2.0 * B * S * keys * H * Da)
    flop_counter.add("distill_kl", lambda: 2.0 * B * n * keys * NI * D * grads)
