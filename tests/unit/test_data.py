"""The data layer: tokenizers, preprocessing, the bundled corpus, dataset building, resumable loading."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import multiprocessing
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset

from indexcache_train.data.builder import build_datasets
from indexcache_train.data.config import (
    BUNDLED_CORPUS_DIR,
    BUNDLED_TOKENIZER,
    DataConfig,
    DataConfigError,
)
from indexcache_train.data.indexed_writer import OutputExistsError
from indexcache_train.data.loader import build_dataloader
from indexcache_train.data.preprocess import PreprocessError, main, preprocess_jsonl
from indexcache_train.data.tokenizer import TokenizerError, load_tokenizer

EOT = 50256
TEXTS = [
    "Hello world",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune...",
    "",  # empty text: with --append-eod it is a one-token document
    "Ünïcödé — “quotes”, emoji 🔎︎ and\n\nnewlines\t\ttabs   ",
    "word " * 3000,  # a long document
    *(f"Document number {i}: {'lorem ipsum ' * (i % 13)}" for i in range(60)),
]


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer(BUNDLED_TOKENIZER)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def _docs(prefix: Path) -> list[list[int]]:
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


# ----------------------------------------------------------------------------- tokenizer
def test_bundled_gpt2_tokenizer(gpt2):
    assert gpt2.tokenize("Hello world") == [15496, 995]  # corpus-v1 README's reference ids
    assert (gpt2.vocab_size, gpt2.eod, gpt2.pad) == (50257, EOT, -1)
    assert gpt2.detokenize(gpt2.tokenize(TEXTS[3])) == TEXTS[3]
    assert pickle.loads(pickle.dumps(gpt2)).tokenize("Hello world") == [15496, 995]


def test_tokenizer_errors(tmp_path):
    fake = tmp_path / "other.tiktoken"
    fake.write_text("IQ== 0\n")
    (tmp_path / "empty_dir").mkdir()
    cases = {
        tmp_path / "missing.tiktoken": "not found",
        fake: "unknown .tiktoken ranks",
        tmp_path / "empty_dir": "no tokenizer.json",
        Path(__file__): "neither a .tiktoken file nor a directory",
    }
    for path, message in cases.items():
        with pytest.raises(TokenizerError, match=message):
            load_tokenizer(path)


def test_light_modules_do_not_import_torch(subprocess_env):
    # Preprocessing workers and config validation rely on this to start fast.
    code = (
        "import sys, indexcache_train.data.tokenizer, indexcache_train.data.config, "
        "indexcache_train.data.preprocess; "
        "assert not {'torch', 'megatron'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env)


# ----------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize(("suffix", "workers"), [("", 1), (".xz", 2), (".gz", 2)])
def test_preprocess_roundtrip(tmp_path, gpt2, suffix, workers):
    src = _write_jsonl(
        tmp_path / f"in.jsonl{suffix}", [{"text": t, "id": i} for i, t in enumerate(TEXTS)]
    )
    stats = preprocess_jsonl(
        src, tmp_path / "out/docs", BUNDLED_TOKENIZER, workers=workers, append_eod=True
    )
    expected = [[*gpt2.tokenize(t), EOT] for t in TEXTS]
    assert _docs(tmp_path / "out/docs") == expected
    assert IndexedDataset(str(tmp_path / "out/docs")).index.dtype == np.uint16
    assert (stats.documents, stats.tokens) == (len(TEXTS), sum(map(len, expected)))


def test_preprocess_json_key_and_empty_documents(tmp_path, gpt2):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"body": "a b"}, {"body": ""}, {"body": "c"}])
    stats = preprocess_jsonl(src, tmp_path / "o", BUNDLED_TOKENIZER, json_key="body")
    assert _docs(tmp_path / "o") == [gpt2.tokenize("a b"), gpt2.tokenize("c")]
    assert stats.skipped_empty == 1


def test_preprocess_hf_tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<eos>"], initial_alphabet=alphabet
    )
    bpe.train_from_iterator(TEXTS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>")
    hf.save_pretrained(tmp_path / "tok")

    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS[:5]])
    preprocess_jsonl(src, tmp_path / "o", tmp_path / "tok", workers=2, append_eod=True)
    eos = hf.eos_token_id
    assert _docs(tmp_path / "o") == [
        [*hf.encode(t, add_special_tokens=False), eos] for t in TEXTS[:5]
    ]


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[dict, type[Exception], str]]:
    good = [{"text": f"line {i}"} for i in range(200)]
    _write_jsonl(tmp_path / "missing_key.jsonl", [*good, {"body": "x"}, *good])
    (tmp_path / "bad_json.jsonl").write_text('{"text": "a"}\n{"text": \n')
    _write_jsonl(tmp_path / "not_str.jsonl", [{"text": 3}])
    _write_jsonl(tmp_path / "ok.jsonl", good)
    return {
        "missing input": (
            {"input_path": tmp_path / "nope.jsonl"},
            PreprocessError,
            "input file not found",
        ),
        "missing key": (
            {"input_path": tmp_path / "missing_key.jsonl"},
            PreprocessError,
            r":201: no key 'text'",
        ),
        "bad json": (
            {"input_path": tmp_path / "bad_json.jsonl"},
            PreprocessError,
            ":2: not valid JSON",
        ),
        "not a string": (
            {"input_path": tmp_path / "not_str.jsonl"},
            PreprocessError,
            "not a string",
        ),
        "bad tokenizer": (
            {"tokenizer": tmp_path / "ok.jsonl"},
            TokenizerError,
            "neither a .tiktoken",
        ),
    }


@pytest.mark.parametrize(
    "case", ["missing input", "missing key", "bad json", "not a string", "bad tokenizer"]
)
def test_preprocess_bad_inputs_leave_no_files(tmp_path, case):
    overrides, exc, message = _bad_inputs(tmp_path)[case]
    kwargs = {"input_path": tmp_path / "ok.jsonl", "tokenizer": BUNDLED_TOKENIZER, **overrides}
    with pytest.raises(exc, match=message):
        preprocess_jsonl(output_prefix=tmp_path / "out/x", workers=2, **kwargs)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_preprocess_keeps_existing_output_on_error_and_without_overwrite(tmp_path, gpt2):
    _write_jsonl(tmp_path / "ok.jsonl", [{"text": "old"}])
    _write_jsonl(tmp_path / "bad.jsonl", [{"text": "new"}, {"oops": 1}])
    preprocess_jsonl(tmp_path / "ok.jsonl", tmp_path / "x", BUNDLED_TOKENIZER)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        preprocess_jsonl(tmp_path / "ok.jsonl", tmp_path / "x", BUNDLED_TOKENIZER)
    with pytest.raises(PreprocessError):
        preprocess_jsonl(tmp_path / "bad.jsonl", tmp_path / "x", BUNDLED_TOKENIZER, overwrite=True)
    assert _docs(tmp_path / "x") == [gpt2.tokenize("old")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "ok.jsonl", "x.bin", "x.idx"]


def test_preprocess_main_reports_errors(tmp_path, capsys):
    rc = main(
        [
            "--input",
            str(tmp_path / "nope.jsonl"),
            "--output-prefix",
            str(tmp_path / "o"),
            "--tokenizer",
            str(BUNDLED_TOKENIZER),
        ]
    )
    assert rc == 1
    assert "input file not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bundled corpus
def test_bundled_corpus_opens_and_matches_readme():
    train = IndexedDataset(str(BUNDLED_CORPUS_DIR / "train"))
    val = IndexedDataset(str(BUNDLED_CORPUS_DIR / "val"))
    assert int(train.sequence_lengths.sum()) >= 1_000_000
    assert len(val) > 0 and train.index.dtype == np.uint16
    for ds in (train, val):  # every document ends with EOT and has no other EOT
        for i in range(len(ds)):
            doc = ds[i]
            assert doc[-1] == EOT and not (doc[:-1] == EOT).any()
    # The README's sha256 table is the provenance record; it must describe these exact bytes.
    readme = (BUNDLED_CORPUS_DIR / "README.md").read_text()
    listed = dict(re.findall(r"\| `([\w.]+)` \| [\d,]+ \| `([0-9a-f]{64})` \|", readme))
    assert set(listed) == {"train.bin", "train.idx", "val.bin", "val.idx", "gpt2.tiktoken"}
    for name, sha in listed.items():
        assert hashlib.sha256((BUNDLED_CORPUS_DIR / name).read_bytes()).hexdigest() == sha, name
    assert sum(p.stat().st_size for p in BUNDLED_CORPUS_DIR.iterdir()) < 8_000_000


# ----------------------------------------------------------------------------- datasets
def _check_sample(sample: dict[str, torch.Tensor], seq: int, vocab: int) -> None:
    # A BlendedDataset adds which source the sample came from.
    assert set(sample) - {"dataset_id"} == {"tokens", "labels", "loss_mask", "position_ids"}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert sample[key].shape == (seq,), key
    assert sample["tokens"].dtype == torch.int64 and sample["loss_mask"].dtype == torch.float32
    assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])  # labels are shifted tokens
    assert torch.equal(sample["position_ids"], torch.arange(seq))
    assert int(sample["tokens"].max()) < vocab


def test_build_datasets_bundled_corpus(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path))
    train, valid = build_datasets(cfg, seq_length=64, train_samples=500, valid_samples=20, seed=7)
    assert isinstance(train, GPTDataset) and isinstance(valid, GPTDataset)
    assert len(train) >= 500 and len(valid) >= 20
    _check_sample(train[0], 64, 50257)
    _check_sample(valid[0], 64, 50257)
    again, _ = build_datasets(cfg, seq_length=64, train_samples=500, valid_samples=20, seed=7)
    other, _ = build_datasets(cfg, seq_length=64, train_samples=500, valid_samples=20, seed=8)
    assert torch.equal(again[3]["tokens"], train[3]["tokens"])  # deterministic given the seed
    assert not all(torch.equal(other[i]["tokens"], train[i]["tokens"]) for i in range(4))


def test_build_datasets_mock(tmp_path):
    cfg = DataConfig(kind="mock", cache_dir=str(tmp_path))
    train, valid = build_datasets(cfg, seq_length=32, train_samples=64, valid_samples=8, seed=0)
    assert isinstance(train, MockGPTDataset)
    _check_sample(train[5], 32, 50257)
    _check_sample(valid[0], 32, 50257)


def test_build_datasets_blend_and_split(tmp_path):
    train_p, val_p = str(BUNDLED_CORPUS_DIR / "train"), str(BUNDLED_CORPUS_DIR / "val")
    cfg = DataConfig(
        train_prefixes=["0.8", train_p, "0.2", val_p],
        valid_prefixes=[val_p],
        cache_dir=str(tmp_path),
    )
    train, valid = build_datasets(cfg, seq_length=64, train_samples=300, valid_samples=10, seed=1)
    assert isinstance(train, BlendedDataset) and len(train) == 300
    assert np.bincount(train.dataset_index).tolist() == [240, 60]
    _check_sample(train[299], 64, 50257)
    cfg = DataConfig(prefix=[train_p], split="90,10,0", cache_dir=str(tmp_path))
    train, valid = build_datasets(cfg, seq_length=64, train_samples=300, valid_samples=10, seed=1)
    assert set(train.indices.tolist()).isdisjoint(valid.indices.tolist())  # split by document


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "arrow"}, "data.kind"),
        ({"prefix": ["a"], "train_prefixes": ["b"]}, "cannot be combined"),
        ({"valid_prefixes": ["a"]}, "train_prefixes is not"),
        ({"train_prefixes": []}, "non-empty list"),
    ],
)
def test_data_config_errors(kwargs, message):
    with pytest.raises(DataConfigError, match=message):
        DataConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_length": 128}, "differs from the model's seq_length=64"),
        ({"train_prefixes": ["0.5", "nowhere/x"]}, "no dataset at 'nowhere/x'"),
        (
            {"train_prefixes": ["0.5", str(BUNDLED_CORPUS_DIR / "train"), "0.5"]},
            "looks like a weight",
        ),
    ],
)
def test_build_datasets_errors(tmp_path, kwargs, message):
    cfg = DataConfig(cache_dir=str(tmp_path), **kwargs)
    with pytest.raises(DataConfigError, match=message):
        build_datasets(cfg, seq_length=64, train_samples=10, valid_samples=1, seed=0)


# ----------------------------------------------------------------------------- resumable loader
@pytest.fixture(scope="module")
def train_ds(tmp_path_factory):
    # A tiny corpus (~300 samples) so the loaders can be iterated to the end quickly.
    tmp = tmp_path_factory.mktemp("loader")
    _write_jsonl(tmp / "in.jsonl", [{"text": t} for t in TEXTS])
    preprocess_jsonl(tmp / "in.jsonl", tmp / "tiny", BUNDLED_TOKENIZER, append_eod=True)
    cfg = DataConfig(train_prefixes=[str(tmp / "tiny")], cache_dir=str(tmp / "cache"))
    return build_datasets(cfg, seq_length=32, train_samples=96, valid_samples=1, seed=3)[0]


def _tokens(loader) -> list[torch.Tensor]:
    # clone(): batches from worker processes live in shared memory, one file descriptor each.
    return [batch["tokens"].clone() for batch in loader]


@pytest.mark.parametrize(("dp", "workers"), [(1, 0), (2, 0), (2, 2)])
def test_loader_resume_is_exact(train_ds, dp, workers):
    mbs, k = 3, 3 * dp * 5  # resume after 5 global micro-steps
    for rank in range(dp):
        kw = {"data_parallel_rank": rank, "data_parallel_size": dp, "num_workers": workers}
        full = _tokens(build_dataloader(train_ds, mbs, 0, **kw))
        resumed = _tokens(build_dataloader(train_ds, mbs, k, **kw))
        assert len(full) == len(train_ds) // (mbs * dp) and len(resumed) == len(full) - 5
        assert all(torch.equal(a, b) for a, b in zip(full[5:], resumed, strict=True))
    # The DP ranks together see exactly the single-rank stream, in order.
    ranks = [
        _tokens(build_dataloader(train_ds, mbs, 0, data_parallel_rank=r, data_parallel_size=dp))
        for r in range(dp)
    ]
    single = _tokens(build_dataloader(train_ds, mbs * dp, 0))
    assert all(
        torch.equal(torch.cat(parts), whole)
        for parts, whole in zip(zip(*ranks), single, strict=True)
    )
    assert torch.equal(single[0][0], train_ds[0]["tokens"])


def test_loader_rejects_bad_consumed_samples(train_ds):
    with pytest.raises(ValueError, match="multiple of"):
        build_dataloader(train_ds, 4, 6)
    with pytest.raises(ValueError, match="exceeds"):
        build_dataloader(train_ds, 4, 4 * len(train_ds))


# ----------------------------------------------------------------------------- torch.distributed
def _rank_main(rank: int, init_file: str, cache: str, out: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    try:
        cfg = DataConfig(cache_dir=cache)
        train, valid = build_datasets(
            cfg, seq_length=32, train_samples=50, valid_samples=5, seed=11
        )
        only0 = build_datasets(
            cfg,
            seq_length=32,
            train_samples=50,
            valid_samples=5,
            seed=11,
            is_built_on_rank=lambda: rank == 0,
        )
        result = {
            "first": train[0]["tokens"].tolist(),
            "valid": valid is not None,
            "only0": [d is not None for d in only0],
        }
        Path(f"{out}.{rank}").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def test_build_datasets_on_two_ranks(tmp_path):
    # spawn, not fork: a forked child would inherit any process group an earlier test left open
    ctx = multiprocessing.get_context("spawn")
    args = (str(tmp_path / "init"), str(tmp_path / "cache"), str(tmp_path / "result"))
    procs = [ctx.Process(target=_rank_main, args=(r, *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = (json.loads((tmp_path / f"result.{r}").read_text()) for r in range(2))
    assert r0["first"] == r1["first"] and r0["valid"] and r1["valid"]  # every rank gets the data
    assert r0["only0"] == [True, True] and r1["only0"] == [False, False]
    assert len(list((tmp_path / "cache").glob("*/*-GPTDataset-train-shuffle_index.npy"))) == 1
