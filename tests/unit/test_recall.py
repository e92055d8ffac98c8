"""Shared-layer recall (evaluation metric): the math against brute force, the model hook, and
the evaluation metrics dict.

Shape legend: B batch, S query rows, T keys, H heads, D head dim, K slots.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import indexcache_train.model.attention as attention_module
import indexcache_train.ops.api as ops_api
import indexcache_train.training.step as step_module
from indexcache_train.loss.recall import head_sum_probs_all_keys, topk_recall
from indexcache_train.model.forward_state import DistillSettings
from indexcache_train.model.toy_configs import glm5_toy_hf_config
from indexcache_train.ops.masking import KeyRange
from indexcache_train.schedule import IndexCacheSchedule
from indexcache_train.training.step import StepRunner, eval_metrics
from tests.helpers.megatron_env import init_single_process
from tests.helpers.models import build_toy, state

B, S, H, D, K = 2, 13, 3, 5, 4
SCALE = D**-0.5


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q_BSHD = torch.randn(B, S, H, D, generator=g, dtype=torch.float64) * 2
    kv_BTD = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    return q_BSHD, kv_BTD


def _packed_range() -> KeyRange:
    """Batch 0: documents starting at 0 and 6; batch 1 causal except an empty row 5."""
    key_start_BS = torch.zeros(B, S, dtype=torch.long)
    key_start_BS[0, 6:] = 6
    key_start_BS[1, 5] = 6
    return KeyRange(torch.arange(S).expand(B, S).clone(), key_start_BS)


def _random_sets(kr: KeyRange, seed: int, size: int = K) -> torch.Tensor:
    """Up to ``size`` random valid keys per row, -1 padded, in random slot order."""
    g = torch.Generator().manual_seed(seed)
    idx_BSK = torch.full((B, S, size), -1, dtype=torch.int32)
    for b in range(B):
        for s in range(S):
            keys = torch.arange(int(kr.key_start_BS[b, s]), int(kr.query_index_BS[b, s]) + 1)
            keys = keys[torch.randperm(len(keys), generator=g)][:size]
            row = torch.cat([keys, torch.full((size - len(keys),), -1)])
            idx_BSK[b, s] = row[torch.randperm(size, generator=g)].to(torch.int32)
    return idx_BSK


def _brute_probs(q_BSHD, kv_BTD, kr: KeyRange) -> torch.Tensor:
    """Full ``[B, S, T]`` head-summed probabilities (test only)."""
    s_BHST = torch.einsum("bshd,btd->bhst", q_BSHD, kv_BTD) * SCALE
    valid_BST = kr.dense_mask(kv_BTD.shape[1])
    s_BHST = s_BHST.masked_fill(~valid_BST[:, None], float("-inf"))
    return torch.softmax(s_BHST, -1).nan_to_num(0.0).sum(1)


def _brute_recall(
    p_BST: torch.Tensor, kr: KeyRange, reused_BSK: torch.Tensor, k: int
) -> tuple[float, int]:
    valid_BST = kr.dense_mask(p_BST.shape[-1])
    total, rows = 0.0, 0
    for b in range(B):
        for s in range(S):
            n = int(valid_BST[b, s].sum())
            if n == 0:
                continue
            kt = min(k, n)
            own = set(p_BST[b, s].argsort(descending=True)[:kt].tolist())  # invalid keys have p = 0
            reused = set(reused_BSK[b, s].tolist()) - {-1}
            total += len(own & reused) / kt
            rows += 1
    return total, rows


def test_head_sum_probs_all_keys_equals_brute_force() -> None:
    q, kv = _inputs(0)
    kr = _packed_range()
    ref_BST = _brute_probs(q, kv, kr)
    got_BST = head_sum_probs_all_keys(q[:, 3:9], kv, kr.rows(3, 9).dense_mask(S), SCALE)
    assert torch.allclose(got_BST, ref_BST[:, 3:9], rtol=0, atol=1e-12)
    # Every head's row is a distribution over all valid keys; the empty row is all zeros.
    sums_BS = ref_BST.sum(-1)
    assert torch.allclose(
        sums_BS[kr.num_valid() > 0], torch.full_like(sums_BS[kr.num_valid() > 0], H)
    )
    assert (ref_BST[1, 5] == 0).all()


@pytest.mark.parametrize("chunk", [1, 4, S, 64])
@pytest.mark.parametrize("seed", [1, 2])
def test_topk_recall_equals_brute_force(chunk: int, seed: int) -> None:
    q, kv = _inputs(seed)
    kr = _packed_range()
    reused_BSK = _random_sets(kr, 10 + seed)
    p_BST = _brute_probs(q, kv, kr)
    ref_total, ref_rows = _brute_recall(p_BST, kr, reused_BSK, K)
    got = topk_recall(lambda s0, s1: p_BST[:, s0:s1], kr, reused_BSK, K, S, chunk)
    assert got[1].item() == ref_rows == B * S - 1  # the empty row is skipped
    assert got[0].item() == pytest.approx(ref_total, abs=1e-12)
    assert 0.2 < ref_total / ref_rows < 0.9  # random sets: neither trivially 0 nor 1


def test_recall_is_one_for_own_topk_and_zero_for_disjoint_sets() -> None:
    q, kv = _inputs(3)
    kr = _packed_range()
    p_BST = _brute_probs(q, kv, kr)
    own_BSK = p_BST.masked_fill(~kr.dense_mask(S), -1.0).topk(K, -1)
    own_idx = torch.where(own_BSK.values >= 0, own_BSK.indices, -1).to(torch.int32)
    full = topk_recall(lambda s0, s1: p_BST[:, s0:s1], kr, own_idx, K, S, 5)
    assert full[0].item() == pytest.approx(full[1].item())
    empty = torch.full_like(own_idx, -1)
    assert topk_recall(lambda s0, s1: p_BST[:, s0:s1], kr, empty, K, S, 5)[0].item() == 0.0
    # A larger reused set (more slots than the metric's k) can only raise recall.
    wide = _random_sets(kr, 4, size=2 * K)
    narrow = wide[..., :K]
    r_wide = topk_recall(lambda s0, s1: p_BST[:, s0:s1], kr, wide, K, S, 5)[0]
    r_narrow = topk_recall(lambda s0, s1: p_BST[:, s0:s1], kr, narrow, K, S, 5)[0]
    assert r_wide >= r_narrow


# ------------------------------------------------------------------ the model hook
SEQ = 32
FREQ2 = dict(
    num_hidden_layers=4, index_topk_freq=2, index_skip_topk_offset=1, initializer_range=0.1
)


@pytest.fixture(scope="module", autouse=True)
def _megatron() -> None:
    init_single_process()


def _toy():
    torch.manual_seed(0)
    cfg, model = build_toy(glm5_toy_hf_config(**FREQ2))
    model.config.finalize_model_grads_func = None
    return cfg, model.eval()


def _forward(model, cfg, ids, attention: str, measure: bool, captured: dict | None = None):
    st = state(
        cfg,
        ids.shape[0],
        SEQ,
        attention=attention,
        measure_recall=measure,
        captured_topk=captured,
        distill=DistillSettings(mode="none", compute_grad=False),
    )
    with torch.no_grad():
        logits = model(ids, torch.arange(SEQ).expand(ids.shape[0], SEQ), None, dsa_state=st)
    return logits, st


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_model_hook_measures_every_layer_with_the_reused_topk(attention: str, monkeypatch) -> None:
    cfg, model = _toy()
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    calls: dict[int, tuple] = {}
    real = attention_module.topk_recall

    def spy(probs_fn, key_range, reused_BSK, topk, num_keys, chunk=128):
        layer = len(calls)  # layers run in order: 0..3, then the MTP layer 4
        calls[layer] = (probs_fn(0, SEQ), reused_BSK.clone(), topk, num_keys)
        return real(probs_fn, key_range, reused_BSK, topk, num_keys, chunk)

    monkeypatch.setattr(attention_module, "topk_recall", spy)
    plain, _ = _forward(model, cfg, ids, attention, measure=False)
    assert calls == {}  # off by default: no cost outside evaluation
    captured: dict[int, torch.Tensor] = {}
    logits, st = _forward(model, cfg, ids, attention, measure=True, captured=captured)
    assert torch.equal(logits, plain)  # measuring does not perturb the forward
    assert set(st.recall) == {0, 1, 2, 3, 4}
    for layer, (probs_BST, reused_BSK, topk, num_keys) in calls.items():
        assert (topk, num_keys) == (cfg.index_topk, SEQ)
        source = cfg.schedule.source(layer)
        if attention == "sparse":  # the indices this layer attended are the ones scored
            assert torch.equal(reused_BSK, captured[layer]) and torch.equal(
                reused_BSK, captured[source]
            )
        else:
            assert torch.equal(reused_BSK, calls[source][1])
        # Full-key head-summed probabilities: H per row, nothing on future keys.
        assert torch.allclose(
            probs_BST.sum(-1), torch.full((2, SEQ), float(cfg.num_attention_heads)), atol=1e-4
        )
        assert (probs_BST.triu(1) == 0).all()
        hits, rows = st.recall[layer].tolist()
        assert rows == 2 * SEQ and 0.0 < hits / rows < 1.0
    if attention == "dense":  # layer 0 sees the same inputs in both modes: the two forms agree
        _, sparse_state = _forward(model, cfg, ids, "sparse", measure=True)
        assert sparse_state.recall[0].tolist() == pytest.approx(st.recall[0].tolist(), abs=1e-9)


def test_step_runner_reports_row_weighted_recall(monkeypatch) -> None:
    cfg, model = _toy()
    ids = torch.randint(0, cfg.vocab_size, (4, SEQ + 1), generator=torch.Generator().manual_seed(1))

    def batches(mbs: int) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, 4, mbs):
            t = ids[i : i + mbs]
            yield {
                "tokens": t[:, :-1],
                "labels": t[:, 1:],
                "loss_mask": torch.ones(mbs, SEQ),
                "position_ids": torch.arange(SEQ).expand(mbs, SEQ),
            }

    def run(mbs: int, eval_rows: int):
        runner = StepRunner(cfg.schedule, SEQ, mbs, torch.device("cpu"))
        with torch.no_grad():
            result = runner.run(
                [model],
                batches(mbs),
                4 // mbs,
                attention="sparse",
                distill=DistillSettings(mode="multi", compute_grad=False),
                frozen_trunk=False,
                forward_only=True,
                measure_recall=True,
                eval_rows=eval_rows,
            )
        return result

    made = []
    real_state = step_module.DSAForwardState
    monkeypatch.setattr(
        step_module,
        "DSAForwardState",
        lambda *a, **kw: made.append(real_state(*a, **kw)) or made[-1],
    )
    one, two = run(4, 0), run(2, 0)
    assert set(one.recall) == {0, 1, 2, 3, 4}
    for layer in one.recall:
        assert one.recall[layer] == pytest.approx(two.recall[layer], abs=1e-12)
    # logging.eval_rows reaches every micro-batch's state: a quarter of the rows is measured.
    made.clear()
    run(2, SEQ // 4)
    assert [int(st.recall[0][1]) for st in made] == [2 * SEQ // 4] * 2


def test_eval_metrics_names_and_averages() -> None:
    sched = IndexCacheSchedule.from_freq_offset(4, 2, 1)  # F S F S
    kl = {(0, 0): 1.0, (0, 1): 3.0, (2, 2): 2.0, (2, 3): 6.0}
    recall = {0: 0.9, 1: 0.5, 2: 0.8, 3: 0.3}
    own = eval_metrics(5.0, kl, recall, sched, DistillSettings(mode="own_layer"))
    assert own["eval/lm_loss"] == 5.0
    assert own["eval/indexer_loss"] == 1.5  # the run's own objective: own-layer terms
    assert own["eval/l_multi"] == 3.0  # (2 + 4) / 2 Full layers, whatever the run's mode
    assert own["eval/l_multi/layer0"] == 2.0 and own["eval/l_multi/layer2"] == 4.0
    assert own["eval/shared_kl"] == 4.5
    assert own["eval/kl/0->1"] == 3.0
    assert own["eval/recall/layer1"] == 0.5
    assert own["eval/shared_recall"] == pytest.approx(0.4) and own[
        "eval/full_recall"
    ] == pytest.approx(0.85)
    multi = eval_metrics(5.0, kl, recall, sched, DistillSettings(mode="multi"))
    assert multi["eval/indexer_loss"] == multi["eval/l_multi"] == 3.0
    weighted = eval_metrics(
        5.0, kl, recall, sched, DistillSettings(mode="own_layer", weights=(3.0, 1.0))
    )
    assert weighted["eval/l_multi"] == pytest.approx(
        (0.75 * 1 + 0.25 * 3 + 0.75 * 2 + 0.25 * 6) / 2
    )


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_evaluation_measures_sampled_rows_exactly(attention: str, monkeypatch) -> None:
    """``eval_rows`` < S: recall and the per-pair KL see exactly the exact run's rows at the
    sampled positions (its probabilities, reused top-k, attention and indexer rows)."""
    cfg, model = _toy()
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(2))
    seen: list[dict] = []
    real_recall = attention_module.topk_recall
    term_name, rows_key = (
        ("sparse_distill", "topk_BSK") if attention == "sparse" else ("dense_distill", "key_range")
    )
    real_term = getattr(ops_api, term_name)

    def recall_spy(probs_fn, key_range, reused_BSK, topk, num_keys, chunk=128):
        n = reused_BSK.shape[1]
        seen[-1]["recall"].append((probs_fn(0, n), key_range.query_index_BS, reused_BSK))
        return real_recall(probs_fn, key_range, reused_BSK, topk, num_keys, chunk)

    def term_spy(**kw):
        names = ("attn_q_BSHD", "attn_lse_BSH", rows_key, "idx_q_BSID", "idx_w_BSI")
        seen[-1]["term"].append(tuple(kw[n] for n in names))
        return real_term(**kw)

    monkeypatch.setattr(attention_module, "topk_recall", recall_spy)
    monkeypatch.setattr(ops_api, term_name, term_spy)
    runs = {}
    for eval_rows in (0, SEQ // 4):
        seen.append({"recall": [], "term": []})
        st = state(
            cfg,
            2,
            SEQ,
            attention=attention,
            measure_recall=True,
            eval_rows=eval_rows,
            distill=DistillSettings(mode="multi", compute_grad=False),
        )
        with torch.no_grad():
            model(ids, torch.arange(SEQ).expand(2, SEQ), None, dsa_state=st)
        runs[eval_rows] = st
    exact, sampled = seen
    pos = sampled["recall"][0][1][0]
    assert torch.equal(pos // 4, torch.arange(SEQ // 4))  # one position per block of 4
    for (p_all, _, r_all), (p, qi, r) in zip(exact["recall"], sampled["recall"], strict=True):
        assert torch.equal(qi[0], pos)
        assert torch.allclose(p, p_all[:, pos], atol=1e-6) and torch.equal(r, r_all[:, pos])
    for full, part in zip(exact["term"], sampled["term"], strict=True):
        aq, lse, rows, iq, iw = full
        assert torch.equal(part[0], aq[:, pos]) and torch.equal(part[1], lse[:, pos])
        assert torch.equal(part[3], iq[:, pos]) and torch.equal(part[4], iw[:, pos])
        if attention == "sparse":
            assert torch.equal(part[2], rows[:, pos])
        else:
            assert torch.equal(part[2].query_index_BS, rows.query_index_BS[:, pos])
    assert runs[SEQ // 4].recall[0][1].item() == 2 * SEQ // 4
    assert set(runs[SEQ // 4].kl_terms) == set(runs[0].kl_terms)
