"""The multi-layer distillation loss (issue #4): its math, its scaling, and who learns from it.

1. The chunked KL ops (``sparse_kl_sum`` / ``dense_kl_sum``) against a brute-force reference that
   materialises ``[S, T]`` (here only), Proposition 1 in float64, chunking, packed documents,
   short and empty rows.
2. The toy model through Megatron's schedule and directly: 2 micro-batches of b/2 == 1 of b,
   ``loss_coeff`` / ``distill.weights``, only Full-layer indexers learn from the loss, trunk
   gradients do not see it, the warm-up optimizer, recompute, the ``own_layer`` ablation.
3. Logged averages over Full layers.

Shape legend: B batch, S query rows, T keys, K top-k slots, I indexer heads, D indexer head dim,
J layers of one share group.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from indexcache_train.config.schema import StageSection
from indexcache_train.loss.autoscaler import IndexCacheLossAutoScaler
from indexcache_train.model.factory import ParallelSettings
from indexcache_train.model.forward_state import DistillSettings
from indexcache_train.model.toy_configs import glm5_toy_hf_config
from indexcache_train.ops.kl_reference import dense_kl_sum, sparse_kl_sum
from indexcache_train.ops.masking import KeyRange
from indexcache_train.schedule import IndexCacheSchedule
from indexcache_train.training.model_setup import is_indexer_param, set_trainable
from indexcache_train.training.step import StepRunner, multi_loss_by_full_layer
from tests.helpers.megatron_env import init_single_process
from tests.helpers.models import CPU_PARALLEL, build_toy, state

F64 = torch.float64
B, S, NI, D, K = 2, 11, 3, 8, 4  # NI: indexer heads (I in shape suffixes)
SCALE = D**-0.5
PROP1_TOL = 1e-10  # issue #4: max abs gradient difference in float64
MICRO_TOL = 1e-6  # issue #4: 2 x (b/2) vs 1 x b, fp32
RECOMPUTE_RTOL = 1e-5  # of each gradient's max (fp32 rounding; see the recompute test)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ============================================================================ 1. the ops
def _indexer(
    seed: int, dtype: torch.dtype = F64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q_BSID = torch.randn(B, S, NI, D, generator=g, dtype=dtype).requires_grad_()
    k_BTD = torch.randn(B, S, D, generator=g, dtype=dtype).requires_grad_()
    w_BSI = torch.randn(B, S, NI, generator=g, dtype=dtype).requires_grad_()
    return q_BSID, k_BTD, w_BSI


def _packed_range() -> KeyRange:
    """Batch 0: three packed documents starting at 0, 4 and 9 (rows 0-3, 4-6 and 9-10 have fewer
    valid keys than K). Batch 1: causal, except row 6 whose key range is empty."""
    key_start_BS = torch.zeros(B, S, dtype=torch.long)
    for doc_start in (4, 9):
        key_start_BS[0, doc_start:] = doc_start
    key_start_BS[1, 6] = 7  # key_start > query index: no valid key
    return KeyRange(torch.arange(S).expand(B, S).clone(), key_start_BS)


EMPTY_ROW = (1, 6)


def _dense_target(kr: KeyRange, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """A random distribution over each row's valid keys, ``[B, S, T]`` (all zeros on an empty row)."""
    g = torch.Generator().manual_seed(seed)
    p_BST = torch.rand(B, S, S, generator=g, dtype=dtype) + 0.05
    p_BST = p_BST * kr.dense_mask(S)
    return p_BST / p_BST.sum(-1, keepdim=True).clamp_min(1e-30)


def _topk_slots(kr: KeyRange, seed: int) -> torch.Tensor:
    """Up to K distinct valid keys per row, ``-1`` for missing slots, slots in random order."""
    g = torch.Generator().manual_seed(seed)
    idx_BSK = torch.full((B, S, K), -1, dtype=torch.int32)
    for b in range(B):
        for s in range(S):
            lo, hi = int(kr.key_start_BS[b, s]), int(kr.query_index_BS[b, s])
            keys = torch.arange(lo, hi + 1)
            keys = keys[torch.randperm(len(keys), generator=g)][:K] if len(keys) else keys
            row = torch.cat([keys, torch.full((K - len(keys),), -1)])
            idx_BSK[b, s] = row[torch.randperm(K, generator=g)].to(torch.int32)
    return idx_BSK


def _sparse_target(idx_BSK: torch.Tensor, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p_BSK = (torch.rand(idx_BSK.shape, generator=g, dtype=dtype) + 0.05) * (idx_BSK >= 0)
    return p_BSK / p_BSK.sum(-1, keepdim=True).clamp_min(1e-30)


def _brute_logits(q_BSID, k_BTD, w_BSI) -> torch.Tensor:
    """The whole ``[B, S, T]`` index-score matrix (test only)."""
    dots_BSIT = torch.einsum("bsid,btd->bsit", q_BSID, k_BTD) * SCALE
    return torch.einsum("bsi,bsit->bst", w_BSI, torch.relu(dots_BSIT))


def _brute_kl(p_BSX: torch.Tensor, z_BSX: torch.Tensor, valid_BSX: torch.Tensor) -> torch.Tensor:
    """``sum_rows KL(p || softmax(z))`` over valid slots; rows without a valid slot are skipped."""
    rows = valid_BSX.any(-1)
    p, z, valid = p_BSX[rows], z_BSX[rows], valid_BSX[rows]
    logq = torch.log_softmax(z.masked_fill(~valid, float("-inf")), -1)
    return torch.where(valid, torch.xlogy(p, p) - p * logq, torch.zeros_like(p)).sum()


def _brute_dense(p_BST, kr: KeyRange, q, k, w) -> torch.Tensor:
    return _brute_kl(p_BST, _brute_logits(q, k, w), kr.dense_mask(S))


def _brute_sparse(p_BSK, idx_BSK, q, k, w) -> torch.Tensor:
    z_BSK = _brute_logits(q, k, w).gather(-1, idx_BSK.long().clamp_min(0))
    return _brute_kl(p_BSK, z_BSK, idx_BSK >= 0)


def _dense_op(p_BST, kr, q, k, w, chunk: int) -> torch.Tensor:
    return dense_kl_sum(lambda s0, s1: p_BST[:, s0:s1], kr, q, k, w, SCALE, chunk)


def _sparse_op(p_BSK, idx_BSK, q, k, w, chunk: int) -> torch.Tensor:
    return sparse_kl_sum(p_BSK, idx_BSK, q, k, w, SCALE, chunk)


def _loss_and_grads(fn, *inputs) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    loss = fn()
    return loss.detach(), torch.autograd.grad(loss, inputs)


CHUNKS = [1, 3, 4, S, 64]  # 3 and 4 do not divide S = 11; 64 is one chunk


@pytest.mark.parametrize("chunk", CHUNKS)
def test_dense_kl_equals_brute_force_packed_short_and_empty_rows(chunk: int) -> None:
    q, k, w = _indexer(0)
    kr = _packed_range()
    p_BST = _dense_target(kr, 1)
    ref, ref_g = _loss_and_grads(lambda: _brute_dense(p_BST, kr, q, k, w), q, k, w)
    got, got_g = _loss_and_grads(lambda: _dense_op(p_BST, kr, q, k, w, chunk), q, k, w)
    assert ref.item() > 0.1
    assert abs(got.item() - ref.item()) <= 1e-12 * ref.item()
    for a, b in zip(got_g, ref_g):
        assert torch.isfinite(a).all()
        assert _max_diff(a, b) <= PROP1_TOL
    assert max(g.abs().max().item() for g in ref_g) > 1e-2  # the comparison is not vacuous


@pytest.mark.parametrize("chunk", CHUNKS)
def test_sparse_kl_equals_brute_force_packed_short_and_empty_rows(chunk: int) -> None:
    q, k, w = _indexer(0)
    kr = _packed_range()
    idx_BSK = _topk_slots(kr, 2)
    assert (idx_BSK[0, :3] >= 0).sum(-1).tolist() == [1, 2, 3]  # rows with fewer keys than K
    assert (idx_BSK[EMPTY_ROW] < 0).all()
    p_BSK = _sparse_target(idx_BSK, 3)
    ref, ref_g = _loss_and_grads(lambda: _brute_sparse(p_BSK, idx_BSK, q, k, w), q, k, w)
    got, got_g = _loss_and_grads(lambda: _sparse_op(p_BSK, idx_BSK, q, k, w, chunk), q, k, w)
    assert ref.item() > 0.1
    assert abs(got.item() - ref.item()) <= 1e-12 * ref.item()
    for a, b in zip(got_g, ref_g):
        assert torch.isfinite(a).all()
        assert _max_diff(a, b) <= PROP1_TOL
    assert max(g.abs().max().item() for g in ref_g) > 1e-2


@pytest.mark.parametrize("form", ["dense", "sparse"])
@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_chunked_equals_unchunked_fp32(form: str, chunk: int) -> None:
    q, k, w = _indexer(4, torch.float32)
    kr = _packed_range()
    if form == "dense":
        p = _dense_target(kr, 5, torch.float32)

        def run(c: int) -> torch.Tensor:
            return _dense_op(p, kr, q, k, w, c)
    else:
        idx = _topk_slots(kr, 6)
        p = _sparse_target(idx, 7, torch.float32)

        def run(c: int) -> torch.Tensor:
            return _sparse_op(p, idx, q, k, w, c)

    whole, whole_g = _loss_and_grads(lambda: run(S), q, k, w)
    part, part_g = _loss_and_grads(lambda: run(chunk), q, k, w)
    assert abs(part.item() - whole.item()) <= 1e-6 * whole.item()
    for a, b in zip(part_g, whole_g):
        assert _max_diff(a, b) <= 1e-6 * max(b.abs().max().item(), 1.0)


def test_dense_target_is_computed_once_per_chunk() -> None:
    """Gradients come from the forward: backward never rebuilds the target (under TP each
    build is a reduction over the TP group)."""
    kr = _packed_range()
    p_BST = _dense_target(kr, 3)
    q, k, w = _indexer(4)
    calls: list[tuple[int, int]] = []

    def target(s0: int, s1: int) -> torch.Tensor:
        calls.append((s0, s1))
        return p_BST[:, s0:s1]

    dense_kl_sum(target, kr, q, k, w, SCALE, 4).backward()
    assert calls == [(0, 4), (4, 8), (8, S)]
    assert q.grad is not None and k.grad is not None and w.grad is not None


@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_row_without_valid_key_contributes_exactly_zero(form: str) -> None:
    """Only the empty row, with a garbage (non-zero) target: the term is 0.0 and gradients are
    finite zeros (a naive log_softmax over an all -inf row gives NaN forward and backward)."""
    q, k, w = _indexer(8)
    b, s = EMPTY_ROW
    q1, w1, k1 = q[b : b + 1, s : s + 1], w[b : b + 1, s : s + 1], k[b : b + 1]
    if form == "dense":
        kr = _packed_range()
        row = KeyRange(
            kr.query_index_BS[b : b + 1, s : s + 1], kr.key_start_BS[b : b + 1, s : s + 1]
        )
        garbage = torch.ones(1, 1, S, dtype=F64)
        loss = dense_kl_sum(lambda s0, s1: garbage[:, s0:s1], row, q1, k1, w1, SCALE, 4)
    else:
        idx = torch.full((1, 1, K), -1, dtype=torch.int32)
        loss = sparse_kl_sum(torch.ones(1, 1, K, dtype=F64), idx, q1, k1, w1, SCALE, 4)
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, (q, k, w)):
        assert torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("form", ["dense", "sparse"])
@pytest.mark.parametrize("weights_J", [(1 / 3, 1 / 3, 1 / 3), (0.5, 0.3, 0.2)])
def test_proposition_1_sum_of_terms_equals_kl_to_mixture(
    form: str, weights_J: tuple[float, ...]
) -> None:
    """grad sum_j w_j KL(p_j || q) == grad KL(pbar || q), pbar = sum_j w_j p_j (float64)."""
    q, k, w = _indexer(9)
    kr = _packed_range()
    if form == "dense":
        targets_J = [_dense_target(kr, 10 + j) for j in range(len(weights_J))]

        def term(p: torch.Tensor) -> torch.Tensor:
            return _dense_op(p, kr, q, k, w, 4)
    else:
        idx = _topk_slots(kr, 11)
        targets_J = [_sparse_target(idx, 12 + j) for j in range(len(weights_J))]

        def term(p: torch.Tensor) -> torch.Tensor:
            return _sparse_op(p, idx, q, k, w, 4)

    pbar = sum(wj * p for wj, p in zip(weights_J, targets_J))
    per_layer, per_layer_g = _loss_and_grads(
        lambda: sum(wj * term(p) for wj, p in zip(weights_J, targets_J)), q, k, w
    )
    mixture, mixture_g = _loss_and_grads(lambda: term(pbar), q, k, w)
    # The values differ by the targets' entropy gap (Jensen): only the gradients coincide.
    assert per_layer.item() > mixture.item() + 1e-3
    for a, b in zip(per_layer_g, mixture_g):
        assert _max_diff(a, b) <= PROP1_TOL
    assert max(g.abs().max().item() for g in mixture_g) > 1e-2


# ============================================================================ 2. the model
SEQ = 32
# initializer_range 0.1 (toy default 0.02) gives peaked attention and indexer scores, so the KL
# terms and indexer gradients are O(1e-2): far above the tolerances, a wrong scale cannot hide.
FREQ2 = dict(
    num_hidden_layers=4, index_topk_freq=2, index_skip_topk_offset=1, initializer_range=0.1
)
FREQ4 = dict(
    num_hidden_layers=4, index_topk_freq=4, index_skip_topk_offset=1, initializer_range=0.1
)
RECOMPUTE = ParallelSettings(
    moe_token_dispatcher_type="allgather",
    recompute_granularity="full",
    recompute_method="uniform",
    recompute_num_layers=1,
)


@pytest.fixture(scope="module", autouse=True)
def _megatron() -> None:
    init_single_process()


@pytest.fixture(autouse=True)
def _fresh_loss_scale() -> Iterator[None]:
    # The scale is process-wide (fed by Megatron's schedule); direct model calls expect 1.
    IndexCacheLossAutoScaler.reset()
    yield
    IndexCacheLossAutoScaler.reset()


def _toy(sizes: dict, par: ParallelSettings = CPU_PARALLEL, seed: int = 0):
    torch.manual_seed(seed)
    cfg, model = build_toy(glm5_toy_hf_config(**sizes), par)
    model.config.finalize_model_grads_func = None  # no DDP here: plain .grad accumulation
    return cfg, model


def _tokens(cfg, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, cfg.vocab_size, (batch, SEQ + 1), generator=torch.Generator().manual_seed(seed)
    )


def _full_indexer_layers(cfg) -> set[str]:
    """Parameter-name prefixes of the Full layers' attention (the MTP layer included)."""
    n = cfg.schedule.num_layers
    full = [i for i in range(n + cfg.num_mtp_layers) if cfg.schedule.is_full(i)]
    return {
        f"decoder.layers.{i}." if i < n else f"mtp.layers.{i - n}.mtp_model_layer." for i in full
    }


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _direct(
    model,
    cfg,
    ids: torch.Tensor,
    *,
    attention: str,
    distill: DistillSettings,
    lm_weight: float = 1.0,
):
    """One forward/backward without the schedule (loss scale 1); ``lm_weight=0`` backpropagates
    the attached distillation terms only."""
    model.zero_grad(set_to_none=True)
    b = ids.shape[0]
    st = state(cfg, b, SEQ, attention=attention, distill=distill)
    lm = model(ids[:, :-1], torch.arange(SEQ).expand(b, SEQ), None, labels=ids[:, 1:], dsa_state=st)
    (lm.mean() * lm_weight).backward()
    return _grads(model), st


def _scheduled(
    model, cfg, ids: torch.Tensor, micro_batch_size: int, *, stage: str, distill: DistillSettings
):
    """One step through Megatron's ``get_forward_backward_func`` (our StepRunner), as training."""
    model.zero_grad(set_to_none=True)
    frozen = stage == "warmup"
    set_trainable([model], StageSection(trainable="indexers" if frozen else "all"))

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, ids.shape[0], micro_batch_size):
            t = ids[i : i + micro_batch_size]
            yield {
                "tokens": t[:, :-1],
                "labels": t[:, 1:],
                "loss_mask": torch.ones(len(t), SEQ),
                "position_ids": torch.arange(SEQ).expand(len(t), SEQ),
            }

    runner = StepRunner(cfg.schedule, SEQ, micro_batch_size, torch.device("cpu"))
    result = runner.run(
        [model],
        batches(),
        ids.shape[0] // micro_batch_size,
        attention="dense" if frozen else "sparse",
        distill=distill,
        frozen_trunk=frozen,
        forward_only=False,
    )
    return result, _grads(model)


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_two_micro_batches_of_half_equal_one_of_full(stage: str) -> None:
    cfg, model = _toy(FREQ2)
    ids = _tokens(cfg, 4)
    multi = DistillSettings(mode="multi")
    one, g_one = _scheduled(model, cfg, ids, 4, stage=stage, distill=multi)
    two, g_two = _scheduled(model, cfg, ids, 2, stage=stage, distill=multi)
    assert abs(one.lm_loss - two.lm_loss) <= MICRO_TOL
    assert one.kl.keys() == two.kl.keys() and all(
        abs(one.kl[p] - two.kl[p]) <= MICRO_TOL for p in one.kl
    )
    assert g_one.keys() == g_two.keys()
    indexer = {n for n in g_one if is_indexer_param(n)}
    assert {n.split("self_attention")[0] for n in indexer} == _full_indexer_layers(cfg)
    if stage == "warmup":
        assert indexer == set(g_one)  # frozen trunk: nothing else has a gradient
    else:
        assert len(set(g_one) - indexer) > 50  # trunk by the LM loss
    for n in g_one:
        assert _max_diff(g_one[n], g_two[n]) <= MICRO_TOL, n
    assert max(g_one[n].abs().max().item() for n in indexer) > 100 * MICRO_TOL

    # Control: without the schedule's hook the indexer loss is not divided by the number of
    # micro-batches, and this comparison fails (the check above can fail).
    hook = model.config.experimental_attention_variant_loss_scale_func
    model.config.experimental_attention_variant_loss_scale_func = None
    try:
        IndexCacheLossAutoScaler.reset()
        _, g_bad = _scheduled(model, cfg, ids, 2, stage=stage, distill=multi)
    finally:
        model.config.experimental_attention_variant_loss_scale_func = hook
    assert max(_max_diff(g_bad[n], g_one[n]) for n in indexer) > 100 * MICRO_TOL


def test_loss_coeff_scales_indexer_gradients_linearly() -> None:
    cfg, model = _toy(FREQ2)
    ids = _tokens(cfg, 2)
    g1, _ = _direct(
        model, cfg, ids, attention="sparse", distill=DistillSettings(mode="multi", loss_coeff=1.0)
    )
    g3, _ = _direct(
        model, cfg, ids, attention="sparse", distill=DistillSettings(mode="multi", loss_coeff=2.5)
    )
    assert g1.keys() == g3.keys()
    for n in g1:
        if is_indexer_param(n):
            assert _max_diff(g3[n], 2.5 * g1[n]) <= 1e-5 * g1[n].abs().max().item(), n
            assert g1[n].abs().max() > 0
        else:
            assert torch.equal(g3[n], g1[n]), n  # the trunk never sees the coefficient


def test_distill_settings_weight_as_documented() -> None:
    uniform = DistillSettings(mode="multi")
    assert [uniform.weight(j, 4) for j in range(4)] == [0.25] * 4
    assert uniform.weight(0, 1) == 1.0
    listed = DistillSettings(mode="multi", weights=(4.0, 3.0, 2.0, 1.0))
    assert [listed.weight(j, 4) for j in range(4)] == [0.4, 0.3, 0.2, 0.1]
    # Renormalised over each group's own length (the first entries of the list).
    assert [listed.weight(j, 2) for j in range(2)] == [4 / 7, 3 / 7]
    assert listed.weight(0, 1) == 1.0
    with pytest.raises(ValueError, match="one weight per position"):
        DistillSettings(mode="multi", weights=(1.0, 1.0)).weight(0, 3)
    with pytest.raises(ValueError, match="zero total weight"):
        DistillSettings(mode="multi", weights=(0.0, 1.0)).weight(0, 1)
    own = DistillSettings(mode="own_layer", weights=(1.0, 1.0))  # own_layer ignores weights
    assert [own.weight(j, 3) for j in range(3)] == [1.0, 0.0, 0.0]


def test_distill_weights_change_gradients_as_documented() -> None:
    """Freq 2 groups (F, S) and the 1-layer MTP group: the loss is linear in the renormalised
    weights, so g(3, 1) = (g(1, 0) + g(1, 1)) / 2, and (1, 1) / (2, 2) are exactly uniform."""
    cfg, model = _toy(FREQ2)
    ids = _tokens(cfg, 2)

    def g(weights) -> dict[str, torch.Tensor]:
        grads, _ = _direct(
            model,
            cfg,
            ids,
            attention="sparse",
            distill=DistillSettings(mode="multi", weights=weights),
        )
        return {n: t for n, t in grads.items() if is_indexer_param(n)}

    uniform, ones, twos, own, skew = (
        g("uniform"),
        g((1.0, 1.0)),
        g((2.0, 2.0)),
        g((1.0, 0.0)),
        g((3.0, 1.0)),
    )
    for n in uniform:
        assert torch.equal(ones[n], uniform[n]) and torch.equal(twos[n], uniform[n]), n
        assert (
            _max_diff(skew[n], 0.5 * (own[n] + ones[n])) <= 1e-5 * uniform[n].abs().max().item()
        ), n
    layer0 = "decoder.layers.0.self_attention.core_attention.indexer.linear_wq_b.weight"
    assert _max_diff(own[layer0], uniform[layer0]) > 1e-4  # the Shared layer's term matters


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_only_full_layer_indexers_get_gradient_from_the_loss(attention: str) -> None:
    """Backpropagate the distillation terms alone: zero LM gradient, and the MTP loss (which its
    own autoscaler backpropagates whatever the output gradient) scaled to 0."""
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    cfg, model = _toy(FREQ2)
    ids = _tokens(cfg, 2)
    MTPLossAutoScaler.set_loss_scale(torch.tensor(0.0))
    try:
        grads, _ = _direct(
            model,
            cfg,
            ids,
            attention=attention,
            distill=DistillSettings(mode="multi"),
            lm_weight=0.0,
        )
    finally:
        MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    seen = set()
    for n, _ in model.named_parameters():
        g = grads.get(n)
        if is_indexer_param(n):
            assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0, n
            seen.add(n.split("self_attention")[0])
        else:
            assert g is None or not g.any(), n  # the loss leaks into no other parameter
    assert seen == _full_indexer_layers(cfg)


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_trunk_gradients_identical_with_and_without_the_loss(attention: str) -> None:
    cfg, model = _toy(FREQ2)
    ids = _tokens(cfg, 2)
    with_loss, _ = _direct(
        model, cfg, ids, attention=attention, distill=DistillSettings(mode="multi")
    )
    without, st = _direct(
        model, cfg, ids, attention=attention, distill=DistillSettings(mode="none")
    )
    assert st.kl_terms == {}
    assert not any(is_indexer_param(n) for n in without)  # indexers are not in the LM graph
    trunk = [n for n in with_loss if not is_indexer_param(n)]
    assert sorted(trunk) == sorted(without)
    for n in trunk:
        assert torch.equal(with_loss[n], without[n]), n


def _optimizer_params(optimizer) -> set[int]:
    out = set()
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        out |= {id(p) for p in opt.model_param_group_index_map}
    return out


def test_warmup_optimizer_holds_exactly_the_full_layer_indexers() -> None:
    from indexcache_train.config.compose import compose
    from indexcache_train.config.validate import validate
    from indexcache_train.training.model_setup import build_chunks, wrap_stage

    cfg = compose(["+experiment=toy"])
    resolved = validate(cfg, 1)
    torch.manual_seed(0)
    chunks, tcfg = build_chunks(cfg, resolved.model, None, torch.device("cpu"))
    warmup, sparse = cfg.recipe.stages
    assert warmup.trainable == "indexers" and sparse.trainable == "all"
    named = {n: p for n, p in chunks[0].named_parameters()}
    indexers = {n for n in named if is_indexer_param(n)}
    assert {n.split("self_attention")[0] for n in indexers} == _full_indexer_layers(resolved.model)

    wrapped = wrap_stage(cfg, chunks, tcfg, warmup)
    assert set(wrapped.trainable) == indexers
    assert _optimizer_params(wrapped.optimizer) == {id(named[n]) for n in indexers}
    before = {n: p.detach().clone() for n, p in named.items()}
    # One real warm-up step: the indexers receive non-zero gradients and move; the trunk is
    # bit-for-bit unchanged (a graph-less warm-up would leave only weight decay moving them).
    ids = torch.randint(
        0,
        512,
        (cfg.optim.global_batch_size, cfg.model.seq_length + 1),
        generator=torch.Generator().manual_seed(0),
    )
    runner = StepRunner(
        resolved.model.schedule,
        cfg.model.seq_length,
        cfg.optim.micro_batch_size,
        torch.device("cpu"),
    )
    mbs = cfg.optim.micro_batch_size
    batches = iter(
        [
            {
                "tokens": ids[i : i + mbs, :-1],
                "labels": ids[i : i + mbs, 1:],
                "loss_mask": torch.ones(mbs, cfg.model.seq_length),
                "position_ids": torch.arange(cfg.model.seq_length).expand(mbs, -1),
            }
            for i in range(0, len(ids), mbs)
        ]
    )
    for c in wrapped.ddp_chunks:
        c.zero_grad_buffer()
    runner.run(
        wrapped.ddp_chunks,
        batches,
        resolved.num_microbatches,
        attention="dense",
        distill=DistillSettings(mode="multi"),
        frozen_trunk=True,
        forward_only=False,
    )
    for n in indexers:
        assert named[n].main_grad.abs().max() > 0, n
    ok, _, _ = wrapped.optimizer.step()
    assert ok
    for n, p in named.items():
        assert torch.equal(p, before[n]) != (n in indexers), n

    wrapped = wrap_stage(cfg, chunks, tcfg, sparse)  # the sparse stage trains everything
    assert _optimizer_params(wrapped.optimizer) == {id(p) for p in named.values()}


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_recompute_gives_identical_gradients_with_the_loss_on(attention: str) -> None:
    cfg, plain = _toy(FREQ2)
    _, recomputed = _toy(FREQ2, RECOMPUTE, seed=1)
    recomputed.load_state_dict(plain.state_dict())
    ids = _tokens(cfg, 2)
    multi = DistillSettings(mode="multi")
    ref, st_ref = _direct(plain, cfg, ids, attention=attention, distill=multi)
    got, st_got = _direct(recomputed, cfg, ids, attention=attention, distill=multi)
    # Identical up to fp32 rounding: the checkpointed first pass runs under no_grad, where the
    # MoE layers round differently in the last bits (layer 0's term is bit-identical). Reusing
    # a wrong top-k in the recompute would change gradients at O(1) relative.
    assert st_got.kl_terms.keys() == st_ref.kl_terms.keys()
    for pair, value in st_ref.kl_terms.items():
        assert abs(st_got.kl_terms[pair].item() - value.item()) <= 1e-6 * value.item(), pair
    assert torch.equal(st_got.kl_terms[(0, 0)], st_ref.kl_terms[(0, 0)])
    assert ref.keys() == got.keys() and any(is_indexer_param(n) for n in ref)
    for n in ref:
        assert _max_diff(got[n], ref[n]) <= RECOMPUTE_RTOL * ref[n].abs().max().item(), n


def test_own_layer_gives_shared_layers_no_term_and_full_layers_their_own() -> None:
    cfg, model = _toy(FREQ4)  # F S S S + MTP (Full)
    assert cfg.schedule.pattern == "FSSS"
    ids = _tokens(cfg, 2)
    own, st_own = _direct(
        model, cfg, ids, attention="sparse", distill=DistillSettings(mode="own_layer")
    )
    multi, st_multi = _direct(
        model, cfg, ids, attention="sparse", distill=DistillSettings(mode="multi")
    )
    only_own, _ = _direct(
        model,
        cfg,
        ids,
        attention="sparse",
        distill=DistillSettings(mode="multi", weights=(1.0, 0.0, 0.0, 0.0)),
    )
    assert set(st_own.kl_terms) == {(0, 0), (4, 4)}
    assert set(st_multi.kl_terms) == {(0, 0), (0, 1), (0, 2), (0, 3), (4, 4)}
    for pair in st_own.kl_terms:
        assert torch.equal(st_own.kl_terms[pair], st_multi.kl_terms[pair])
    assert own.keys() == only_own.keys() == multi.keys()
    for n in own:
        assert torch.equal(own[n], only_own[n]), n
    layer0 = "decoder.layers.0.self_attention.core_attention.indexer.linear_wk.weight"
    assert _max_diff(own[layer0], multi[layer0]) > 1e-4


# ============================================================================ 3. logging
def test_logged_averages_are_over_full_layers_only() -> None:
    sched = IndexCacheSchedule.from_freq_offset(8, 4, 1)  # Full 0 and 4
    kl = {
        (0, 0): 1.0,
        (0, 1): 2.0,
        (0, 2): 3.0,
        (0, 3): 6.0,
        (4, 4): 0.5,
        (4, 5): 0.5,
        (4, 6): 1.5,
        (4, 7): 1.5,
    }
    per_full = multi_loss_by_full_layer(kl, sched, DistillSettings(mode="multi"))
    assert per_full == {0: 3.0, 4: 1.0}
    assert sum(per_full.values()) / len(per_full) == 2.0  # not sum over terms / 8 layers
    weighted = multi_loss_by_full_layer(
        kl, sched, DistillSettings(mode="multi", weights=(1.0, 0.0, 0.0, 1.0))
    )
    assert weighted == {0: 3.5, 4: 1.0}
    # An own_layer run logs its own-layer terms only.
    own_kl = {(0, 0): 1.0, (4, 4): 0.5}
    assert multi_loss_by_full_layer(own_kl, sched, DistillSettings(mode="own_layer")) == {
        0: 1.0,
        4: 0.5,
    }
    # A real forward: one entry per Full layer, the MTP Full layer included.
    cfg, model = _toy(FREQ2)
    st = state(cfg, 2, SEQ, distill=DistillSettings(mode="multi", compute_grad=False))
    ids = _tokens(cfg, 2)
    with torch.no_grad():
        model(ids[:, :-1], torch.arange(SEQ).expand(2, SEQ), None, dsa_state=st)
    measured = {p: float(v) for p, v in st.kl_terms.items()}
    per_full = multi_loss_by_full_layer(measured, cfg.schedule, DistillSettings(mode="multi"))
    assert set(per_full) == {0, 2, 4}
    assert per_full[0] == pytest.approx(0.5 * (measured[(0, 0)] + measured[(0, 1)]))
