"""Bad data at start-up: damaged ``.bin/.idx`` pairs and too-small splits stop with the file
named, before any dataset index is built (and never hang)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from indexcache_train.data.builder import build_datasets
from indexcache_train.data.checks import check_data_sources, read_prefix
from indexcache_train.data.config import BUNDLED_CORPUS_DIR, DataConfig, DataConfigError
from indexcache_train.data.indexed_writer import AtomicIndexedDatasetWriter

SEQ = 16


def _dataset(prefix: Path, docs: list[int]) -> str:
    """A dataset of ``len(docs)`` documents with the given token counts."""
    with AtomicIndexedDatasetWriter(prefix, np.uint16, overwrite=True) as w:
        for i, n in enumerate(docs):
            w.add_document(np.arange(n) % 1000 + i)
    return str(prefix)


@pytest.fixture
def good(tmp_path: Path) -> str:
    return _dataset(tmp_path / "good", [40] * 20)


def _build(cfg_kwargs: dict, tmp_path: Path, valid_samples: int = 2):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), **cfg_kwargs)
    return build_datasets(cfg, seq_length=SEQ, train_samples=8, valid_samples=valid_samples, seed=0)


def test_a_whole_dataset_passes_and_counts_its_tokens(good: str, tmp_path: Path) -> None:
    info = read_prefix(good)
    assert (info.num_documents, info.num_tokens) == (20, 800)
    assert check_data_sources(DataConfig(train_prefixes=[good]), SEQ) == 800
    bundled = read_prefix(str(BUNDLED_CORPUS_DIR / "train"))
    assert bundled.num_tokens == Path(f"{bundled.prefix}.bin").stat().st_size // 2
    train, _ = _build({"train_prefixes": [good]}, tmp_path)
    assert len(train) >= 8


def _empty(prefix: str) -> None:
    Path(f"{prefix}.bin").write_bytes(b"")
    Path(f"{prefix}.idx").write_bytes(b"")


def _truncate(path: str, keep: int) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:keep])


@pytest.mark.parametrize(
    ("damage", "file", "match"),
    [
        (_empty, "idx", r"0 bytes, shorter than the 34-byte header"),
        (lambda p: _truncate(f"{p}.idx", -8), "idx", r"header describes 20 sequences"),
        (lambda p: _truncate(f"{p}.idx", 20), "idx", r"shorter than the 34-byte header"),
        (lambda p: Path(f"{p}.idx").write_bytes(b"X" * 200), "idx", r"bad magic"),
        (lambda p: _truncate(f"{p}.bin", -6), "bin", r"the .bin was cut or the .idx is stale"),
        (lambda p: _truncate(f"{p}.bin", 0), "bin", r"0 bytes, but .* describes 800 tokens"),
        (
            lambda p: Path(f"{p}.bin").write_bytes(Path(f"{p}.bin").read_bytes() + b"\0\0"),
            "bin",
            r"the .bin was cut or the .idx is stale",
        ),
        (lambda p: Path(f"{p}.bin").unlink(), "bin", r"no dataset at"),
    ],
)
def test_damaged_files_are_named_at_build_time(
    good: str, tmp_path: Path, damage, file: str, match: str
) -> None:
    # Before the checks these built fine (the .bin is read lazily: training crashed later) or
    # failed in a bare assert.
    damage(good)
    with pytest.raises(DataConfigError, match=match) as e:
        _build({"train_prefixes": [good]}, tmp_path)
    assert f"{good}.{file}" in str(e.value)


def test_damaged_validation_prefix_is_found_too(good: str, tmp_path: Path) -> None:
    bad = _dataset(tmp_path / "val", [40] * 4)
    _truncate(f"{bad}.bin", -2)
    with pytest.raises(DataConfigError, match=r"val\.bin"):
        _build({"train_prefixes": [good], "valid_prefixes": [bad]}, tmp_path)


@pytest.mark.timeout(120)
def test_a_split_without_a_sample_stops_instead_of_hanging(tmp_path: Path) -> None:
    # 20 documents split 98/2/0: the valid split gets round(0.98*20)..20 = 0 documents, so 0
    # tokens, and Megatron's epoch loop (`while num_tokens < requested: num_tokens += 0`)
    # never ends.
    small = _dataset(tmp_path / "small", [40] * 20)
    for valid_samples in (2, 0):  # Megatron builds (and hangs on) a configured split even for 0
        with pytest.raises(
            DataConfigError, match=r"valid split \(documents 20\.\.20 of 20\) has 0"
        ):
            _build({"prefix": [small], "split": "98,2,0"}, tmp_path, valid_samples)
    # A split that gives the validation set documents trains.
    train, valid = _build({"prefix": [small], "split": "80,20,0"}, tmp_path)
    assert train is not None and valid is not None


@pytest.mark.parametrize("field", ["train_prefixes", "valid_prefixes"])
def test_too_small_for_one_sample_is_refused(field: str, good: str, tmp_path: Path) -> None:
    tiny = _dataset(tmp_path / "tiny", [SEQ])  # one sample needs SEQ + 1 tokens
    prefixes = {"train_prefixes": [good], "valid_prefixes": [good], field: [tiny]}
    with pytest.raises(DataConfigError, match=rf"data.{field}: .*tiny has 16 tokens.*too small"):
        _build(prefixes, tmp_path)


def test_weighted_blend_checks_every_prefix(good: str, tmp_path: Path) -> None:
    other = str(tmp_path / "other")
    shutil.copy(f"{good}.bin", f"{other}.bin")
    shutil.copy(f"{good}.idx", f"{other}.idx")
    _truncate(f"{other}.idx", -1)
    with pytest.raises(DataConfigError, match=r"other\.idx"):
        _build({"train_prefixes": ["0.5", good, "0.5", other]}, tmp_path)
