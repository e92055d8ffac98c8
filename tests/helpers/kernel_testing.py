"""Test and benchmark helpers for the GPU kernels: bf16 PyTorch baselines, metrics, index makers.

The kernels' accuracy bar is relative: their error against the fp32 reference (the ``*_reference``
modules on fp32 copies of the same bf16 inputs) must be at most twice that of *the same
computation done in PyTorch bf16* (bf16 tensors throughout, PyTorch's own fp32-accumulating
matmuls, bf16 results). The ``*_bf16`` functions here are that computation; they are naive
(``[B, H, S, T]`` scores for dense attention, per-chunk gathers for sparse MLA) and meant for
test-sized inputs only.
"""

from __future__ import annotations

import torch

from indexcache_train.ops.masking import KeyRange


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` over finite reference entries (``-inf`` LSE rows compared apart)."""
    ref = ref.detach().double()
    x = x.detach().double()
    keep = torch.isfinite(ref)
    num = (x[keep] - ref[keep]).norm()
    return float(num / ref[keep].norm().clamp_min(1e-30))


def same_inf(x: torch.Tensor, ref: torch.Tensor) -> bool:
    """``-inf`` exactly where the reference has it (rows without a valid key)."""
    return bool(torch.equal(torch.isneginf(x), torch.isneginf(ref)))


# ----------------------------------------------------------------------------- dense attention


def dense_attention_bf16(
    q_BSHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHV: torch.Tensor,
    scale: float,
    key_range: KeyRange | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention with every tensor in bf16 (differentiable); ``(out_BSHV, lse_BSH)``."""
    B, S = q_BSHD.shape[:2]
    T = k_BTHD.shape[1]
    key_range = key_range or KeyRange.causal(B, S, q_BSHD.device)
    s_BHST = torch.einsum("bshd,bthd->bhst", q_BSHD, k_BTHD) * scale
    s_BHST = s_BHST.masked_fill(~key_range.dense_mask(T)[:, None], float("-inf"))
    lse_BHS = torch.logsumexp(s_BHST, dim=-1)
    p_BHST = torch.softmax(s_BHST, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhst,bthv->bshv", p_BHST, v_BTHV)
    return out, lse_BHS.transpose(1, 2)


# ----------------------------------------------------------------------------- sparse MLA


def sparse_mla_bf16_fwd_bwd(
    q_BSHD: torch.Tensor,
    kv_BTD: torch.Tensor,
    idx_BSK: torch.Tensor,
    scale: float,
    v_dim: int,
    dout_BSHV: torch.Tensor,
    chunk: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather + softmax in bf16, forward and backward chunk by chunk: ``(out, lse, dq, dkv)``.

    Query chunks are independent in the forward, so running backward per chunk and letting
    autograd accumulate ``kv.grad`` (in bf16, as a bf16 training step would) equals one backward.
    """
    B, S = q_BSHD.shape[:2]
    kv = kv_BTD.detach().clone().requires_grad_()
    outs, lses, dqs = [], [], []
    for s0 in range(0, S, chunk):
        s1 = min(s0 + chunk, S)
        q = q_BSHD[:, s0:s1].detach().clone().requires_grad_()
        idx = idx_BSK[:, s0:s1].long()
        valid = idx >= 0
        C, K = idx.shape[1:]
        g = torch.gather(kv, 1, idx.clamp_min(0).reshape(B, C * K, 1).expand(-1, -1, kv.shape[-1]))
        g = g.view(B, C, K, -1)
        s_BCHK = torch.einsum("bchd,bckd->bchk", q, g) * scale
        s_BCHK = s_BCHK.masked_fill(~valid[:, :, None], float("-inf"))
        lses.append(torch.logsumexp(s_BCHK, dim=-1).detach())
        p = torch.softmax(s_BCHK, dim=-1).nan_to_num(0.0)
        out = torch.einsum("bchk,bckv->bchv", p, g[..., :v_dim])
        out.backward(dout_BSHV[:, s0:s1])
        outs.append(out.detach())
        dqs.append(q.grad)
    return torch.cat(outs, 1), torch.cat(lses, 1), torch.cat(dqs, 1), kv.grad


def causal_topk_indices(
    B: int,
    S: int,
    K: int,
    device: torch.device | str,
    key_range: KeyRange | None = None,
    generator: torch.Generator | None = None,
    chunk: int = 4096,
) -> torch.Tensor:
    """Random duplicate-free indices ``[B, S, K]`` int32 inside each row's KeyRange, ``-1`` padded.

    Stratified: a row with ``n >= K`` valid keys takes one uniformly random key from each of K
    equal strata of its range (distinct because strata are disjoint and at least one key wide),
    so selections spread over the whole range like uniform sampling (the L2-unfriendly case) at
    O(S*K) cost. A row with ``n < K`` takes all its keys, then ``-1`` (trailing, as the indexer
    writes them; the kernels accept ``-1`` anywhere). Built ``chunk`` rows at a time.
    """
    key_range = key_range or KeyRange.causal(B, S, device)
    lo_BS = key_range.key_start_BS.to(device).expand(B, S)
    n_BS = key_range.num_valid().to(device).expand(B, S)
    out = torch.empty(B, S, K, dtype=torch.int32, device=device)
    j = torch.arange(K, device=device)
    for s0 in range(0, S, chunk):
        lo = lo_BS[:, s0 : s0 + chunk, None]
        n = n_BS[:, s0 : s0 + chunk, None]
        u = torch.rand(B, lo.shape[1], K, device=device, generator=generator)
        # Integer strata [floor(j*n/K), floor((j+1)*n/K)): disjoint and >= 1 wide when n >= K.
        a = j * n.clamp_min(K) // K
        e = (j + 1) * n.clamp_min(K) // K
        strat = lo + a + (u * (e - a)).long()
        few = torch.where(j < n, lo + j, -1)
        out[:, s0 : s0 + chunk] = torch.where(n >= K, strat, few).to(torch.int32)
    return out


# ----------------------------------------------------------------------------- indexer


def indexer_scores_bf16(
    q_BSID: torch.Tensor, k_BTD: torch.Tensor, w_BSI: torch.Tensor, scale: float
) -> torch.Tensor:
    """Indexer scores with bf16 tensors throughout (unmasked ``[B, S, T]``, bf16)."""
    dots = torch.einsum("bsid,btd->bsit", q_BSID, k_BTD) * scale
    return torch.einsum("bsi,bsit->bst", w_BSI.to(q_BSID.dtype), torch.relu(dots))


def topk_agreement(
    idx_BSK: torch.Tensor, ref_BSK: torch.Tensor, scores_BST: torch.Tensor, tol: float
) -> tuple[float, int, int]:
    """``(recall, mismatches, mismatches_not_at_ties)`` of a top-k result against the reference.

    ``scores_BST`` are the fp32 reference scores (masked with ``-inf``). A selected key missing
    from the reference set is acceptable only if its reference score is within ``tol`` of the
    row's k-th (smallest selected) reference score: a tie the two implementations may break
    differently. ``-1`` slots must agree exactly in number per row.
    """
    B, S = idx_BSK.shape[:2]
    valid = idx_BSK >= 0
    rvalid = ref_BSK >= 0
    if not torch.equal(valid.sum(-1), rvalid.sum(-1)):
        return 0.0, -1, -1
    T = scores_BST.shape[-1]
    ref_mask = torch.zeros(B, S, T + 1, dtype=torch.bool, device=idx_BSK.device)
    ref_mask.scatter_(-1, torch.where(rvalid, ref_BSK.long(), T), True)
    ref_mask[..., T] = False
    hit = torch.gather(ref_mask, -1, torch.where(valid, idx_BSK.long(), T)) & valid
    n_valid = int(valid.sum())
    misses = valid & ~hit
    recall = float(hit.sum()) / max(1, n_valid)
    kth = torch.gather(scores_BST, -1, torch.where(rvalid, ref_BSK.long(), 0))
    kth = torch.where(rvalid, kth, float("inf")).amin(-1, keepdim=True)
    got = torch.gather(scores_BST, -1, torch.where(valid, idx_BSK.long(), 0))
    bad = misses & ((got - kth).abs() > tol)
    return recall, int(misses.sum()), int(bad.sum())


# ----------------------------------------------------------------------------- checks
# Each check draws fresh random bf16 inputs, runs the kernel, the fp32 reference (on fp32 copies of
# the same inputs) and the bf16 PyTorch baseline, and returns plain numbers for the test to assert.


def _fresh(
    shape: tuple[int, ...], device: torch.device | str, gen: torch.Generator
) -> torch.Tensor:
    return torch.randn(shape, device=device, generator=gen).to(torch.bfloat16)


def check_dense(
    impl,
    B: int,
    S: int,
    T: int,
    H: int,
    D: int,
    V: int,
    key_range: KeyRange | None,
    device: torch.device | str,
    seed: int = 0,
) -> dict[str, float]:
    """Errors of ``impl(q, k, v, scale, key_range) -> (out, lse)`` forward and backward."""
    from indexcache_train.ops.dense_attention_reference import dense_attention_reference

    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (
        _fresh((B, S, H, D), device, gen),
        _fresh((B, T, H, D), device, gen),
        _fresh((B, T, H, V), device, gen),
    )
    dout = _fresh((B, S, H, V), device, gen)
    scale = D**-0.5
    res: dict[str, float] = {}
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = impl(*leaves, scale, key_range)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [x.float().requires_grad_() for x in (q, k, v)]
    out_r, lse_r = dense_attention_reference(*ref_leaves, scale, key_range)
    grads_r = torch.autograd.grad(out_r, ref_leaves, dout.float())
    bf_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out_b, lse_b = dense_attention_bf16(*bf_leaves, scale, key_range)
    grads_b = torch.autograd.grad(out_b, bf_leaves, dout)
    names = ("out", "lse", "dq", "dk", "dv")
    for name, x, xr, xb in zip(
        names, (out, lse, *grads), (out_r, lse_r, *grads_r), (out_b, lse_b, *grads_b)
    ):
        res[name] = rel_err(x, xr)
        res[name + "_bf16"] = rel_err(xb, xr)
    res["lse_inf_ok"] = float(same_inf(lse, lse_r))
    res["lse_shape_ok"] = float(tuple(lse.shape) == (B, S, H) and lse.dtype == torch.float32)
    return res


def check_sparse_mla(
    impl,
    B: int,
    S: int,
    T: int,
    H: int,
    D: int,
    V: int,
    K: int,
    key_range: KeyRange | None,
    device: torch.device | str,
    seed: int = 0,
    make_indices=None,
) -> dict[str, float]:
    """Errors of ``impl(q, kv, idx, scale, v_dim) -> (out, lse)`` forward and backward.

    ``make_indices(B, S, K, device, key_range, generator)`` draws the indices (default: random
    stratified, :func:`causal_topk_indices`).
    """
    from indexcache_train.ops.sparse_mla_reference import sparse_mla_reference

    gen = torch.Generator(device=device).manual_seed(seed)
    q, kv = _fresh((B, S, H, D), device, gen), _fresh((B, T, D), device, gen)
    dout = _fresh((B, S, H, V), device, gen)
    if key_range is None:
        key_range = KeyRange.causal(B, S, device)
    idx = (make_indices or causal_topk_indices)(B, S, K, device, key_range, gen)
    scale = D**-0.5
    q_l, kv_l = q.clone().requires_grad_(), kv.clone().requires_grad_()
    out, lse = impl(q_l, kv_l, idx, scale, V)
    dq, dkv = torch.autograd.grad(out, (q_l, kv_l), dout)
    q_r, kv_r = q.float().requires_grad_(), kv.float().requires_grad_()
    out_r, lse_r = sparse_mla_reference(q_r, kv_r, idx, scale, V)
    dq_r, dkv_r = torch.autograd.grad(out_r, (q_r, kv_r), dout.float())
    out_b, lse_b, dq_b, dkv_b = sparse_mla_bf16_fwd_bwd(q, kv, idx, scale, V, dout)
    res: dict[str, float] = {}
    for name, x, xr, xb in zip(
        ("out", "lse", "dq", "dkv"),
        (out, lse, dq, dkv),
        (out_r, lse_r, dq_r, dkv_r),
        (out_b, lse_b, dq_b, dkv_b),
    ):
        res[name] = rel_err(x, xr)
        res[name + "_bf16"] = rel_err(xb, xr)
    res["lse_inf_ok"] = float(same_inf(lse, lse_r))
    res["rows_with_empty_slots"] = float(((idx < 0).any(-1)).sum())
    return res


def check_indexer(
    impl,
    B: int,
    S: int,
    T: int,
    I: int,  # noqa: E741 - the legend's indexer-head letter
    D: int,
    K: int,
    key_range: KeyRange | None,
    device: torch.device | str,
    seed: int = 0,
) -> dict[str, float]:
    """Top-k agreement of ``impl(q, k, w, topk, scale, key_range)`` and its score error.

    Scores come from :func:`~indexcache_train.ops.triton_indexer.indexer_scores_triton` (the same
    kernel the top-k path runs); a top-k mismatch counts as a tie only if the two reference
    scores are within twice that kernel's measured maximum score error.
    """
    from indexcache_train.ops.indexer_reference import indexer_logits, indexer_topk_reference
    from indexcache_train.ops.triton_indexer import indexer_scores_triton

    gen = torch.Generator(device=device).manual_seed(seed)
    q, k = _fresh((B, S, I, D), device, gen), _fresh((B, T, D), device, gen)
    w = torch.randn(B, S, I, device=device, generator=gen) * I**-0.5
    scale = D**-0.5
    kr = key_range or KeyRange.causal(B, S, device)
    mask = kr.dense_mask(T)
    ref = indexer_logits(q.float(), k.float(), w, scale).masked_fill(~mask, float("-inf"))
    got = indexer_scores_triton(q, k, w, scale, key_range)
    bf = indexer_scores_bf16(q, k, w, scale).float().masked_fill(~mask, float("-inf"))
    fin = torch.isfinite(ref)
    max_err = float((got - ref)[fin].abs().max()) if bool(fin.any()) else 0.0
    idx = impl(q, k, w, K, scale, key_range)
    idx_r = indexer_topk_reference(q.float(), k.float(), w, K, scale, key_range)
    recall, misses, bad = topk_agreement(idx, idx_r, ref, tol=2 * max_err + 1e-6)
    return {
        "scores": rel_err(got, ref),
        "scores_bf16": rel_err(bf, ref),
        "scores_inf_ok": float(same_inf(got, ref)),
        "recall": recall,
        "misses": float(misses),
        "misses_not_ties": float(bad),
        "shape_ok": float(tuple(idx.shape) == (B, S, min(K, T)) and idx.dtype == torch.int32),
        "empty_slots": float((idx < 0).sum()),
        "empty_slots_ref": float((idx_r < 0).sum()),
    }
