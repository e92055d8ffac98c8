"""The ``eval`` verb: bucket losses and probe scores vs brute force, probe layout, CLI end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from indexcache_train.tools.long_eval import (
    ProbeError,
    ProbeVocab,
    bucket_labels,
    bucket_sums,
    copy_probe,
    default_copy_distances,
    document_rows,
    parse_edges,
    passkey_probe,
    score_probe,
    token_scores,
)

pytestmark = pytest.mark.unit


def test_parse_edges_and_labels() -> None:
    assert parse_edges("0,1K,4k, 16K") == (0, 1024, 4096, 16384)
    assert bucket_labels((0, 1024, 4096, 100)[:3]) == ["0-1K", "1K-4K", "4K+"]
    assert bucket_labels((0, 10)) == ["0-10", "10+"]
    for bad in ("1,2", "0,4,4", "0,x"):
        with pytest.raises(ValueError):
            parse_edges(bad)


def _brute_bucket_loss(nll, doc_lengths, edges):
    """Per-bucket (sum, rows) by walking tokens: row p counts iff tokens p and p+1 exist and
    belong to the same document; its context length is p - (document start) + 1."""
    S = len(nll)
    doc_of = [d for d, n in enumerate(doc_lengths) for _ in range(n)]
    sums, rows = [0.0] * len(edges), [0] * len(edges)
    for p in range(S):
        if p + 1 >= len(doc_of) or doc_of[p] != doc_of[p + 1]:
            continue
        ctx = p - doc_of.index(doc_of[p]) + 1
        b = max(i for i, e in enumerate(edges) if e <= ctx)
        sums[b] += nll[p]
        rows[b] += 1
    return sums, rows


@pytest.mark.parametrize(
    "doc_lengths",
    [[5, 9, 4], [30], [3, 1, 2, 40], [7, 7, 7, 2]],
    ids=["packed", "one", "tiny", "tail"],
)
def test_bucket_loss_matches_brute_force_with_document_boundaries(doc_lengths) -> None:
    S, edges = 20, (0, 2, 5, 8)
    gen = torch.Generator().manual_seed(len(doc_lengths))
    nll = torch.rand(S, generator=gen, dtype=torch.float64) * 4
    context, valid = document_rows(doc_lengths, S)
    sums, rows = bucket_sums(nll[None], context[None], valid[None], edges)
    want_sums, want_rows = _brute_bucket_loss(nll.tolist(), doc_lengths, edges)
    assert rows.tolist() == want_rows
    assert sums.tolist() == pytest.approx(want_sums)
    assert sum(want_rows) > 0


def test_bucket_sums_accumulate_over_batch_rows() -> None:
    nll = torch.tensor([[1.0, 2.0, 3.0], [5.0, 7.0, 11.0]])
    c0, v0 = document_rows([4], 3)
    c1, v1 = document_rows([2, 2], 3)  # row 1 predicts the next document: excluded
    sums, rows = bucket_sums(nll, torch.stack([c0, c1]), torch.stack([v0, v1]), (0, 2))
    assert rows.tolist() == [3, 2]  # contexts: [1, 2, 3] and [1, -, 1]
    assert sums.tolist() == [1.0 + 5.0 + 11.0, 2.0 + 3.0]


# ---------------------------------------------------------------------- probes
VOCAB = ProbeVocab.synthetic(128, seed=3)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_probe_is_well_formed(depth: float) -> None:
    L = 80
    p = passkey_probe(L, depth, VOCAB, seed=7, digits=5)
    assert p == passkey_probe(L, depth, VOCAB, seed=7, digits=5)  # deterministic
    assert len(p.tokens) == L and p.kind == "passkey" and p.target_len == 5
    key = p.tokens[p.target_start :]
    assert p.target_start + p.target_len == L and all(t in VOCAB.digit_ids for t in key)
    # The needle: prefix, the same key, suffix, at the requested depth of the filler.
    n_pre, n_suf = len(VOCAB.needle_prefix), len(VOCAB.needle_suffix)
    fill = L - (n_pre + 5 + n_suf) - (len(VOCAB.question) + 5)
    at = p.anchor - n_pre
    assert at == round(depth * fill)
    assert p.tokens[at : p.anchor] == VOCAB.needle_prefix
    assert p.tokens[p.anchor : p.anchor + 5] == key
    assert p.tokens[p.anchor + 5 : p.anchor + 5 + n_suf] == VOCAB.needle_suffix
    q0 = p.target_start - len(VOCAB.question)
    assert p.tokens[q0 : p.target_start] == VOCAB.question
    # Everything else is filler.
    needle = set(range(at, p.anchor + 5 + n_suf)) | set(range(q0, L))
    assert all(t in VOCAB.filler for i, t in enumerate(p.tokens) if i not in needle)


def test_passkey_keys_vary_with_seed_and_short_probes_are_refused() -> None:
    keys = {passkey_probe(80, 0.5, VOCAB, seed=s).tokens[-5:] for s in range(6)}
    assert len(keys) > 1
    with pytest.raises(ProbeError, match="needs more than"):
        passkey_probe(27, 0.5, VOCAB, seed=0)
    with pytest.raises(ProbeError, match="depth"):
        passkey_probe(80, 1.5, VOCAB, seed=0)


@pytest.mark.parametrize("distance", [6, 20, 54])
def test_copy_probe_repeats_the_span_at_the_distance(distance: int) -> None:
    L, span = 60, 6
    p = copy_probe(L, distance, span, VOCAB, seed=11)
    assert p == copy_probe(L, distance, span, VOCAB, seed=11)
    assert p != copy_probe(L, distance, span, VOCAB, seed=12)
    s1, s2 = p.anchor, L - span
    assert s2 - s1 == distance and len(p.tokens) == L
    assert p.tokens[s1 : s1 + span] == p.tokens[s2:]
    assert all(t in VOCAB.span_pool for t in p.tokens[s2:])
    assert (p.target_start, p.target_len) == (s2 + 1, span - 1)
    copies = set(range(s1, s1 + span)) | set(range(s2, L))
    assert all(t in VOCAB.filler for i, t in enumerate(p.tokens) if i not in copies)
    for bad_distance, bad_span in ((2, span), (L - span + 1, span), (distance, 1)):
        with pytest.raises(ProbeError):
            copy_probe(L, bad_distance, bad_span, VOCAB, 0)


def test_synthetic_vocab_parts_are_disjoint() -> None:
    parts = [VOCAB.digit_ids, VOCAB.needle_prefix, VOCAB.needle_suffix, VOCAB.question]
    parts += [VOCAB.filler, VOCAB.span_pool]
    flat = [t for part in parts for t in part]
    assert len(flat) == len(set(flat)) == 128
    with pytest.raises(ProbeError):
        ProbeVocab.synthetic(32)


def test_tokenizer_vocab_round_trips_the_key() -> None:
    from indexcache_train.data import BUNDLED_TOKENIZER, load_tokenizer

    tok = load_tokenizer(BUNDLED_TOKENIZER)
    vocab = ProbeVocab.from_tokenizer(tok, 50304)
    p = passkey_probe(300, 0.5, vocab, seed=1)
    text = tok.detokenize(list(p.tokens))
    key = tok.detokenize(list(p.tokens[p.target_start :])).strip()
    assert len(key) == 5 and key.isdigit()
    assert f"The pass key is {key}. Remember it." in text
    assert text.endswith(f"What is the pass key? The pass key is {key}")
    assert tok.eod not in vocab.span_pool and vocab.max_id() < 50304


@pytest.mark.parametrize("kind", ["passkey", "copy"])
def test_probe_scores_match_brute_force(kind: str) -> None:
    L, V = 48, 128
    p = passkey_probe(L, 0.3, VOCAB, 5) if kind == "passkey" else copy_probe(L, 20, 7, VOCAB, 5)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(L - 1, V, generator=gen, dtype=torch.float64)
    targets = torch.tensor(p.tokens[1:])
    # Plant greedy hits on some target rows (and, for passkey, leave one miss: exact = 0).
    rows = list(range(p.target_start - 1, p.target_start - 1 + p.target_len))
    for r in rows[:-1]:
        logits[r, targets[r]] += 10.0
    nll, pred = token_scores(logits, targets)
    got = score_probe(p, nll, pred)
    want_nll, hits = 0.0, 0
    for r in rows:
        row = logits[r].tolist()
        lse = math.log(sum(math.exp(v) for v in row))
        want_nll += lse - row[p.tokens[r + 1]]
        hits += max(range(V), key=lambda v: row[v]) == p.tokens[r + 1]
    assert hits == len(rows) - 1  # the last row: random logits, almost surely a miss
    assert got["nll"] == pytest.approx(want_nll / len(rows))
    assert got["acc"] == pytest.approx(hits / len(rows))
    assert got["exact"] == 0.0
    if kind == "copy":  # the no-cue control: the same span tokens in the first copy
        first = range(p.anchor, p.anchor + p.target_len)
        assert [p.tokens[r + 1] for r in first] == [p.tokens[r + 1] for r in rows]
        want_first = sum(float(nll[r]) for r in first) / len(rows)
        assert got["nll_first"] == pytest.approx(want_first)
    else:
        assert "nll_first" not in got
    logits[rows[-1], targets[rows[-1]]] += 50.0
    assert score_probe(p, *token_scores(logits, targets))["exact"] == 1.0


# ---------------------------------------------------------------------- model + CLI
@pytest.fixture(scope="module")
def megatron() -> None:
    from tests.helpers.megatron_env import init_single_process

    init_single_process()


def test_forward_scores_match_the_models_own_loss_and_logits(megatron: None) -> None:
    """The tool keeps only one row through the output layer and recomputes logits in chunks;
    its NLL must equal the model's own per-token LM loss and its argmax the full logits'."""
    from indexcache_train.model.toy_configs import glm5_toy_hf_config
    from indexcache_train.tools.eval_cli import forward_scores
    from tests.helpers.models import build_toy, state

    hf = glm5_toy_hf_config(num_mtp_layers=0, index_topk_freq=2, index_skip_topk_offset=1)
    cfg, model = build_toy(hf)
    model.eval()
    assert "S" in cfg.schedule.pattern
    tokens = torch.randint(0, cfg.vocab_size, (30,), generator=torch.Generator().manual_seed(2))
    nll, pred, recall = forward_scores(model, cfg, tokens, True, chunk=7)
    S = tokens.numel() - 1
    pos = torch.arange(S)[None]
    with torch.no_grad():
        loss = model(
            tokens[None, :-1], pos, None, labels=tokens[None, 1:], dsa_state=state(cfg, 1, S)
        )
        logits = model(tokens[None, :-1], pos, None, dsa_state=state(cfg, 1, S))
    torch.testing.assert_close(nll, loss[0].float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(pred, logits[0].argmax(-1))
    assert sorted(recall) == list(range(cfg.num_layers))
    assert all(0 < float(v[0]) <= float(v[1]) == S for v in recall.values())


def _write_docs(prefix: Path, lengths: list[int]) -> None:
    import numpy as np

    from indexcache_train.data.indexed_writer import AtomicIndexedDatasetWriter

    gen = np.random.default_rng(0)
    with AtomicIndexedDatasetWriter(prefix, np.uint16, overwrite=False) as w:
        for n in lengths:
            w.add_document(gen.integers(0, 128, n))


@pytest.fixture(scope="module")
def toy_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.helpers.hf_toys import make_glm5_toy_config, save_toy_checkpoint

    root = tmp_path_factory.mktemp("eval_hf")
    full = make_glm5_toy_config(num_hidden_layers=4, index_topk_freq=1)
    shared = make_glm5_toy_config(num_hidden_layers=4, index_topk_freq=2, index_skip_topk_offset=1)
    _write_docs(root / "docs", [30, 12, 80, 25, 100])
    return {
        "full": save_toy_checkpoint(full, root / "full"),
        "shared": save_toy_checkpoint(shared, root / "shared", with_mtp=False, seed=1),
        "docs": root / "docs",
    }


def _cli(*argv: str) -> int:
    from indexcache_train.tools.__main__ import main

    return main(["eval", *argv])


def _brute_doc_buckets(ckpt: Path, pattern: str | None, docs, edges) -> tuple[list, list]:
    """The checkpoint's per-token LM loss (the model's own loss path) bucketed by hand."""
    from checkpoint_tools.hf_io import HFCheckpoint
    from indexcache_train.model.forward_state import DSAForwardState
    from indexcache_train.tools.model_io import build_loaded, read_hf_weights, trunk_config

    hf = HFCheckpoint(ckpt)
    cfg = trunk_config(dict(hf.config), pattern)
    model = build_loaded(cfg, read_hf_weights(hf, cfg), torch.float32)
    sums, rows = [0.0] * len(edges), [0] * len(edges)
    for doc in docs:
        S = len(doc) - 1
        pos = torch.arange(S)[None]
        x = torch.tensor(doc)[None]
        with torch.no_grad():
            st = DSAForwardState(cfg.schedule, pos, attention="sparse")
            loss = model(x[:, :-1], pos, None, labels=x[:, 1:], dsa_state=st)[0]
        s, r = _brute_bucket_loss(loss.tolist(), [len(doc)], edges)
        sums = [a + b for a, b in zip(sums, s)]
        rows = [a + b for a, b in zip(rows, r)]
    return sums, rows


def test_cli_end_to_end_two_schedules(
    megatron: None, toy_ckpts: dict[str, Path], tmp_path: Path, capsys
) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = tmp_path / "out"
    full, shared, docs = (str(toy_ckpts[k]) for k in ("full", "shared", "docs"))
    argv = [
        *("--ckpt", f"all-full={full}", "--ckpt", f"fsfs={full}", "--ckpt", f"freq2={shared}"),
        *("--pattern", "fsfs=FSFS", "--data", docs, "--seq", "40", "--docs", "3"),
        *("--min-doc-tokens", "25", "--buckets", "0,8,16,32", "--tokenizer", "none"),
        *("--probe-samples", "2", "--copy-span", "6", "--device", "cpu", "--out", str(out)),
    ]
    assert _cli(*argv) == 0
    printed = capsys.readouterr().out
    table = (out / "results.md").read_text()
    assert table in printed
    lines = table.splitlines()
    assert lines[0].startswith(
        "| checkpoint | pattern | loss | loss 0-8 | loss 8-16 | loss 16-32 |"
    )
    assert [ln.split(" | ")[0] for ln in lines[2:]] == ["| all-full", "| fsfs", "| freq2"]
    doc = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in doc["checkpoints"]}
    assert [rows[n]["pattern"] for n in ("all-full", "fsfs", "freq2")] == ["FFFF", "FSFS", "FSFS"]
    # Documents >= 25 tokens, in order, cut to seq + 1 = 41: 30, 41, 25.
    assert doc["settings"]["doc_tokens"] == [30, 41, 25]
    ds = IndexedDataset(docs)
    texts = [ds[i][:41].tolist() for i in (0, 2, 3)]
    edges = doc["settings"]["bucket_edges"]
    for name, ckpt, pattern in (("all-full", full, None), ("fsfs", full, "FSFS")):
        want_sums, want_rows = _brute_doc_buckets(Path(ckpt), pattern, texts, edges)
        got = rows[name]["buckets"]
        assert [got[b]["tokens"] for b in doc["buckets"]] == want_rows
        assert [got[b]["loss"] for b in doc["buckets"]] == pytest.approx(
            [s / n for s, n in zip(want_sums, want_rows)], rel=1e-5
        )
    # Same weights, different schedules: different losses; recall only where Shared layers exist.
    assert rows["all-full"]["loss"]["overall"] != rows["fsfs"]["loss"]["overall"]
    assert rows["all-full"]["recall"]["shared"] is None
    for name in ("fsfs", "freq2"):
        rec = rows[name]["recall"]
        assert 0.0 < rec["shared"] <= 1.0 and set(rec["per_layer"]) == {"0", "1", "2", "3"}
    probes = rows["freq2"]["probes"]
    assert probes["passkey"]["count"] == 6 and set(probes["passkey"]["by_param"]) == {
        "0.1",
        "0.5",
        "0.9",
    }
    assert probes["copy"]["count"] == 2 and set(probes["copy"]["by_param"]) == {"16"}
    assert "nll_first" in probes["copy"] and "nll_first" not in probes["passkey"]
    assert all(0.0 <= probes[k]["acc"] <= 1.0 for k in ("passkey", "copy"))
    # Outputs exist: refused without --overwrite.
    assert _cli(*argv) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--ckpt", "nodir"), "NAME=VALUE"),
        (("--ckpt", "x=/no/such/dir"), "config.json"),
        (("--ckpt", "a=FULL", "--ckpt", "a=FULL"), "repeat"),
        (("--ckpt", "a=FULL", "--pattern", "b=FSFS"), "no checkpoint is named"),
        (("--ckpt", "a=SHARED", "--pattern", "a=FFFF"), "no indexer weights"),
        (("--ckpt", "a=FULL", "--pattern", "a=SFFF"), "make layer 0 Full"),
        (("--ckpt", "a=FULL", "--min-doc-tokens", "90"), "lower --docs"),
        (("--ckpt", "a=FULL", "--tokenizer", "default"), "vocab_size"),
        (("--ckpt", "a=FULL", "--probes", "passkey,bogus"), "unknown"),
        (("--model", "nope"), "unknown preset"),
    ],
)
def test_bad_input_exits_2_before_compute(
    toy_ckpts: dict[str, Path], tmp_path: Path, capsys, extra, message
) -> None:
    sub = {"FULL": str(toy_ckpts["full"]), "SHARED": str(toy_ckpts["shared"])}
    extra = [next((e.replace(k, v) for k, v in sub.items() if k in e), e) for e in extra]
    base = ("--data", str(toy_ckpts["docs"]), "--seq", "40", "--docs", "2")
    argv = [*base, *extra, "--out", str(tmp_path / "o")]
    if "--tokenizer" not in extra:
        argv += ["--tokenizer", "none"]
    assert _cli(*argv) == 2
    err = capsys.readouterr().err
    assert message in err and "error:" in err
    assert not (tmp_path / "o").exists()


def test_default_copy_distances_fit_without_overlap() -> None:
    # 257 tokens, 32-token span: 16 would overlap the copies, 256 + 32 does not fit.
    assert default_copy_distances(32, 257) == [64]
    assert default_copy_distances(8, 1025) == [16, 64, 256]
    for d in default_copy_distances(32, 4097):
        copy_probe(4097, d, 32, ProbeVocab.synthetic(512), seed=0)  # every default is valid
