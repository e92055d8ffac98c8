"""Test and benchmark helpers for the fused distillation-loss kernels (``ops/triton_distill.py``).

Accuracy bar (same as the other kernels, :mod:`tests.helpers.kernel_testing`): the kernel's error
against the fp32 PyTorch reference (:func:`indexcache_train.ops.api.sparse_distill` /
``dense_distill`` with ``backend="torch"`` on fp32 copies of the same bf16 inputs) must be at
most twice that of *the same computation in PyTorch bf16* (bf16 tensors throughout: the
head-summed target, the indexer logits, log-softmax, the KL and autograd's gradients, ``dk``
accumulated in bf16 over query chunks as a bf16 step would). The ``*_bf16`` functions here are
that computation; they are chunked over query rows (test-sized inputs only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from indexcache_train.ops.masking import KeyRange
from tests.helpers.kernel_testing import causal_topk_indices, rel_err

EPS = 1e-10
BF16 = torch.bfloat16
Term = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------- inputs


def _randn(shape: tuple[int, ...], device: torch.device | str, gen: torch.Generator, std=1.0):
    return (torch.randn(shape, device=device, generator=gen) * std).to(BF16)


def indexer_inputs(
    B: int, S: int, T: int, NI: int, D: int, device: torch.device | str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q [B,S,I,D]``, ``k [B,T,D]`` bf16 and ``w [B,S,I]`` fp32 (``I**-0.5`` folded, as the
    model does); ``NI`` is the number of indexer heads (``I`` in shape suffixes)."""
    q = _randn((B, S, NI, D), device, gen)
    k = _randn((B, T, D), device, gen)
    w = torch.randn(B, S, NI, device=device, generator=gen) * NI**-0.5
    return q, k, w


@torch.no_grad()
def topk_lse(
    q_BSHD: torch.Tensor, kv_BTD: torch.Tensor, idx_BSK: torch.Tensor, scale: float, chunk: int = 32
) -> torch.Tensor:
    """Per-head LSE of the sparse attention over the selected slots, fp32 (``-inf``: no slot)."""
    B, S, H, _ = q_BSHD.shape
    out = torch.empty(B, S, H, dtype=torch.float32, device=q_BSHD.device)
    for s0 in range(0, S, chunk):
        idx = idx_BSK[:, s0 : s0 + chunk].long()
        C, K = idx.shape[1:]
        g = torch.gather(
            kv_BTD.float(),
            1,
            idx.clamp_min(0).reshape(B, C * K, 1).expand(-1, -1, kv_BTD.shape[-1]),
        )
        s = torch.einsum("bchd,bckd->bchk", q_BSHD[:, s0 : s0 + chunk].float(), g.view(B, C, K, -1))
        s = (s * scale).masked_fill(~(idx >= 0)[:, :, None], float("-inf"))
        out[:, s0 : s0 + chunk] = torch.logsumexp(s, -1)
    return out


@torch.no_grad()
def dense_lse(
    q_BSHD: torch.Tensor, k_BTHD: torch.Tensor, key_range: KeyRange, scale: float, chunk: int = 64
) -> torch.Tensor:
    """Per-head LSE of the dense masked attention, fp32 (``-inf`` on rows without a key)."""
    B, S, H, _ = q_BSHD.shape
    T = k_BTHD.shape[1]
    out = torch.empty(B, S, H, dtype=torch.float32, device=q_BSHD.device)
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        s = torch.einsum("bchd,bthd->bhct", q_BSHD[:, s0:s1].float(), k_BTHD.float()) * scale
        s = s.masked_fill(~key_range.rows(s0, s1).dense_mask(T)[:, None], float("-inf"))
        out[:, s0:s1] = torch.logsumexp(s, -1).transpose(1, 2)
    return out


def packed_range(B: int, S: int, starts: list[int], device, empty: tuple[int, int] | None = None):
    """Documents starting at ``starts``; rows ``empty[0]:empty[1]`` get no valid key at all."""
    ks = torch.zeros(S, dtype=torch.long)
    for st in starts:
        ks[st:] = st
    if empty is not None:
        ks[empty[0] : empty[1]] = S + 1  # key_start past the row itself
    return KeyRange.build(B, S, device, key_start_BS=ks)


# ----------------------------------------------------------------------------- bf16 baselines


def _kl_bf16(p: torch.Tensor, z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    z = z.masked_fill(~valid, float("-inf"))
    z = torch.where(valid.any(-1, keepdim=True), z, torch.zeros_like(z))
    logq = torch.log_softmax(z, dim=-1)
    terms = p * (torch.log(p.clamp_min(EPS)) - logq)
    return terms.masked_fill(~valid | (p <= 0), 0.0).sum()


def sparse_term_bf16(
    aq, akv, alse, idx_BSK, ascale, iq, ik, iw, iscale, chunk: int = 64
) -> tuple[torch.Tensor, ...]:
    """``(loss, dq, dk, dw)`` of the sparse term with bf16 tensors throughout."""
    B, S = aq.shape[:2]
    k_leaf = ik.detach().to(BF16).requires_grad_()
    total = torch.zeros((), dtype=torch.float32, device=aq.device)
    dqs, dws = [], []
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        idx = idx_BSK[:, s0:s1].long()
        valid = idx >= 0
        C, K = idx.shape[1:]
        flat = idx.clamp_min(0).reshape(B, C * K, 1)
        with torch.no_grad():
            kv_g = torch.gather(akv.to(BF16), 1, flat.expand(-1, -1, akv.shape[-1])).view(
                B, C, K, -1
            )
            s = torch.einsum("bchd,bckd->bchk", aq[:, s0:s1].to(BF16), kv_g) * ascale
            p = torch.exp(s - alse[:, s0:s1, :, None].to(BF16))
            p = p.masked_fill(~valid[:, :, None], 0.0).nan_to_num(0.0).sum(2)
            p = p / p.sum(-1, keepdim=True).clamp_min(EPS)
        q_c = iq[:, s0:s1].detach().to(BF16).requires_grad_()
        w_c = iw[:, s0:s1].detach().to(BF16).requires_grad_()
        k_g = torch.gather(k_leaf, 1, flat.expand(-1, -1, ik.shape[-1])).view(B, C, K, -1)
        dots = torch.einsum("bcid,bckd->bcik", q_c, k_g) * iscale
        z = torch.einsum("bci,bcik->bck", w_c, torch.relu(dots))
        loss = _kl_bf16(p, z, valid)
        loss.backward()
        total += loss.float()
        dqs.append(q_c.grad)
        dws.append(w_c.grad)
    return total, torch.cat(dqs, 1), k_leaf.grad, torch.cat(dws, 1)


def dense_term_bf16(
    aq, ak, alse, key_range: KeyRange, ascale, iq, ik, iw, iscale, chunk: int = 64
) -> tuple[torch.Tensor, ...]:
    """``(loss, dq, dk, dw)`` of the dense term with bf16 tensors throughout."""
    S = aq.shape[1]
    T = ak.shape[1]
    k_leaf = ik.detach().to(BF16).requires_grad_()
    total = torch.zeros((), dtype=torch.float32, device=aq.device)
    dqs, dws = [], []
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        valid = key_range.rows(s0, s1).dense_mask(T)
        with torch.no_grad():
            s = torch.einsum("bchd,bthd->bhct", aq[:, s0:s1].to(BF16), ak.to(BF16)) * ascale
            p = torch.exp(s - alse[:, s0:s1].transpose(1, 2)[..., None].to(BF16))
            p = p.masked_fill(~valid[:, None], 0.0).nan_to_num(0.0).sum(1)
            p = p / p.sum(-1, keepdim=True).clamp_min(EPS)
        q_c = iq[:, s0:s1].detach().to(BF16).requires_grad_()
        w_c = iw[:, s0:s1].detach().to(BF16).requires_grad_()
        dots = torch.einsum("bcid,btd->bcit", q_c, k_leaf) * iscale
        z = torch.einsum("bci,bcit->bct", w_c, torch.relu(dots))
        loss = _kl_bf16(p, z, valid)
        loss.backward()
        total += loss.float()
        dqs.append(q_c.grad)
        dws.append(w_c.grad)
    return total, torch.cat(dqs, 1), k_leaf.grad, torch.cat(dws, 1)


# ----------------------------------------------------------------------------- checks


def _loss_and_grads(term: Term, attn: dict, iq, ik, iw, iscale) -> tuple[torch.Tensor, ...]:
    """``term(**attn, idx_q_BSID=..., ...)``: the API's (and the kernels') keyword names."""
    q, k, w = [x.detach().clone().requires_grad_() for x in (iq, ik, iw)]
    loss = term(**attn, idx_q_BSID=q, idx_k_BTD=k, idx_w_BSI=w, idx_scale=iscale)
    leaves = [q, k, w]
    grads = torch.autograd.grad(loss, leaves)
    return (loss.detach(), *grads)


def _compare(got: tuple, ref: tuple, bf: tuple) -> dict[str, float]:
    res: dict[str, float] = {}
    for name, x, xr, xb in zip(("loss", "dq", "dk", "dw"), got, ref, bf):
        res[name] = rel_err(x.float(), xr)
        res[name + "_bf16"] = rel_err(xb.float(), xr)
        res[name + "_finite"] = float(bool(torch.isfinite(x).all()))
    res["loss_ref"] = float(ref[0])
    return res


def check_sparse(
    impl: Term,
    ref_impl: Term,
    B: int,
    S: int,
    T: int,
    H: int,
    Da: int,
    I: int,  # noqa: E741 - the legend's indexer-head letter
    D: int,
    K: int,
    key_range: KeyRange | None,
    device: torch.device | str,
    seed: int = 0,
    empty_rows: tuple[int, int] | None = None,
) -> dict[str, float]:
    """Errors of ``impl(attn_q_BSHD=, attn_kv_BTD=, attn_lse_BSH=, topk_BSK=, attn_scale=,
    idx_q_BSID=, idx_k_BTD=, idx_w_BSI=, idx_scale=)`` (loss and grads); ``ref_impl`` alike.

    ``empty_rows`` ``(a, b)``: those rows' top-k slots are all ``-1`` (LSE ``-inf``).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    aq, akv = _randn((B, S, H, Da), device, gen), _randn((B, T, Da), device, gen)
    iq, ik, iw = indexer_inputs(B, S, T, I, D, device, gen)
    kr = key_range or KeyRange.causal(B, S, device)
    idx = causal_topk_indices(B, S, K, device, kr, gen)
    if empty_rows is not None:
        idx[:, empty_rows[0] : empty_rows[1]] = -1
    ascale, iscale = Da**-0.5, D**-0.5
    lse = topk_lse(aq, akv, idx, ascale)
    attn = dict(attn_q_BSHD=aq, attn_kv_BTD=akv, attn_lse_BSH=lse, topk_BSK=idx, attn_scale=ascale)
    got = _loss_and_grads(impl, attn, iq, ik, iw, iscale)
    attn_f = {**attn, "attn_q_BSHD": aq.float(), "attn_kv_BTD": akv.float()}
    ref = _loss_and_grads(ref_impl, attn_f, iq.float(), ik.float(), iw, iscale)
    bf = sparse_term_bf16(aq, akv, lse, idx, ascale, iq, ik, iw, iscale)
    res = _compare(got, ref, bf)
    res["rows_with_empty_slots"] = float((idx < 0).any(-1).sum())
    res["rows_without_keys"] = float((idx < 0).all(-1).sum())
    res["dq_empty_rows_zero"] = float(
        bool((got[1][~(idx >= 0).any(-1)] == 0).all())
        and bool((got[3][~(idx >= 0).any(-1)] == 0).all())
    )
    return res


def check_dense(
    impl: Term,
    ref_impl: Term,
    B: int,
    S: int,
    T: int,
    H: int,
    Dqk: int,
    I: int,  # noqa: E741
    D: int,
    key_range: KeyRange | None,
    device: torch.device | str,
    seed: int = 0,
) -> dict[str, float]:
    """Errors of ``impl(attn_q_BSHD=, attn_k_BTHD=, attn_lse_BSH=, key_range=, attn_scale=,
    idx_q_BSID=, ...)`` (loss and grads; keywords as in :func:`check_sparse`)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    aq, ak = _randn((B, S, H, Dqk), device, gen), _randn((B, T, H, Dqk), device, gen)
    iq, ik, iw = indexer_inputs(B, S, T, I, D, device, gen)
    kr = key_range or KeyRange.causal(B, S, device)
    ascale, iscale = Dqk**-0.5, D**-0.5
    lse = dense_lse(aq, ak, kr, ascale)
    attn = dict(attn_q_BSHD=aq, attn_k_BTHD=ak, attn_lse_BSH=lse, key_range=kr, attn_scale=ascale)
    got = _loss_and_grads(impl, attn, iq, ik, iw, iscale)
    attn_f = {**attn, "attn_q_BSHD": aq.float(), "attn_k_BTHD": ak.float()}
    ref = _loss_and_grads(ref_impl, attn_f, iq.float(), ik.float(), iw, iscale)
    bf = dense_term_bf16(aq, ak, lse, kr, ascale, iq, ik, iw, iscale)
    res = _compare(got, ref, bf)
    empty = kr.num_valid().expand(B, S) == 0
    res["rows_without_keys"] = float(empty.sum())
    res["dq_empty_rows_zero"] = float(
        bool((got[1][empty] == 0).all()) and bool((got[3][empty] == 0).all())
    )
    return res
