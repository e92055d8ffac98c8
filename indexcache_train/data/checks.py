"""Start-up checks of indexed datasets: every ``.idx``/``.bin`` pair whole, every split non-empty.

Megatron-Core 0.19.2 reads an indexed dataset lazily: a truncated ``.idx`` fails with a bare
``assert`` (or reads garbage sizes), a ``.bin`` cut at the tail is found only when a sample
past the cut is read (after hours of training), and a split with no tokens makes
``GPTDataset._get_num_epochs`` loop forever without a word. :func:`check_data_sources` reads
every prefix's header and sizes once, cross-checks them against the ``.bin`` length, and
counts the tokens each split gets, so all of these stop at start-up with the file named.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexcache_train.data.config import DataConfig, DataConfigError, DataNotFoundError

__all__ = ["PrefixInfo", "check_data_sources", "read_prefix"]

#: Megatron's ``.idx`` layout: magic, version <Q, dtype code <B, sequence count <Q,
#: document count <Q, then int32 sizes, int64 pointers, int64 document indices.
_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")
_FIX = (
    "rebuild it with `python -m indexcache_train.data.preprocess` (its writer is atomic, so a "
    "complete file is never half-replaced)"
)


@dataclass(frozen=True)
class PrefixInfo:
    """What a prefix holds, read from its ``.idx`` and checked against its ``.bin``."""

    prefix: str
    doc_tokens: np.ndarray  # tokens per document, int64

    @property
    def num_documents(self) -> int:
        return len(self.doc_tokens)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_tokens.sum())


def _corrupt(path: str, what: str) -> DataConfigError:
    return DataConfigError(f"{path}: {what}; the file is damaged or incomplete: {_FIX}")


def read_prefix(prefix: str) -> PrefixInfo:
    """Read ``PREFIX.idx`` and check it against ``PREFIX.bin`` (header, sizes, pointers, length).

    Raises:
        DataConfigError: A file is missing, truncated, cut at the tail or inconsistent; the
            message names the file and how to rebuild it.
    """
    from megatron.core.datasets.indexed_dataset import DType

    idx, bin_ = f"{prefix}.idx", f"{prefix}.bin"
    for path in (idx, bin_):
        if not Path(path).is_file():
            raise DataNotFoundError(
                f"{path} does not exist; create the dataset with "
                "`python -m indexcache_train.data.preprocess` or fix the data prefix"
            )
    raw = np.memmap(idx, mode="r", dtype=np.uint8) if Path(idx).stat().st_size else b""
    if len(raw) < _HEADER.size:
        raise _corrupt(idx, f"{len(raw)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, version, code, n_seq, n_doc = _HEADER.unpack(bytes(raw[: _HEADER.size]))
    if magic != _MAGIC or version != 1:
        raise _corrupt(idx, "not a Megatron indexed-dataset index (bad magic or version)")
    try:
        itemsize = DType.size(DType.dtype_from_code(code))
    except ValueError:
        raise _corrupt(idx, f"unknown token dtype code {code}") from None
    want = _HEADER.size + 12 * n_seq + 8 * n_doc
    if len(raw) != want:
        raise _corrupt(
            idx, f"{len(raw)} bytes, but its header describes {n_seq} sequences ({want} bytes)"
        )
    offset = _HEADER.size
    sizes = np.frombuffer(raw, np.int32, n_seq, offset).astype(np.int64)
    pointers = np.frombuffer(raw, np.int64, n_seq, offset + 4 * n_seq)
    docs = np.frombuffer(raw, np.int64, n_doc, offset + 12 * n_seq)
    if (sizes < 0).any() or not np.array_equal(
        pointers, np.concatenate([[0], np.cumsum(sizes[:-1]) * itemsize]).astype(np.int64)
    ):
        raise _corrupt(idx, "sequence sizes and pointers disagree")
    if n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq or (np.diff(docs) < 0).any():
        raise _corrupt(idx, "document boundaries are inconsistent")
    bin_bytes = Path(bin_).stat().st_size
    if bin_bytes != int(sizes.sum()) * itemsize:
        raise _corrupt(
            bin_,
            f"{bin_bytes} bytes, but {idx} describes {int(sizes.sum())} tokens "
            f"({int(sizes.sum()) * itemsize} bytes): the .bin was cut or the .idx is stale",
        )
    ends = np.concatenate([[0], np.cumsum(sizes)])
    return PrefixInfo(prefix, ends[docs[1:]] - ends[docs[:-1]])


def _split_ranges(split: str, num_docs: int) -> list[tuple[int, int] | None]:
    """Document ranges of train / valid / test, exactly as Megatron's builder cuts them."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [None if m is None else (round(m[0] * num_docs), round(m[1] * num_docs)) for m in matrix]


def _require_a_sample(field: str, where: str, tokens: int, seq_length: int) -> None:
    # A sample is seq_length + 1 tokens (inputs and shifted labels); with fewer per epoch,
    # Megatron's epoch count never reaches the samples asked for (0 tokens: it loops forever).
    if tokens < seq_length + 1:
        raise DataConfigError(
            f"data.{field}: {where} has {tokens} tokens, fewer than one sample of "
            f"seq_length + 1 = {seq_length + 1}; the data set is too small for this run: use more "
            "data, a shorter model.seq_length"
            + (", or another data.split" if field == "prefix" else "")
        )


def check_data_sources(cfg: DataConfig, seq_length: int) -> int:
    """Check every prefix the run reads; returns the number of training tokens per epoch.

    Every split Megatron builds must hold a sample, whether or not samples are drawn from it:
    the builder sizes a configured validation split even for 0 samples (and hangs on 0 tokens).

    Args:
        cfg: The data config (``kind=mock`` has no files: nothing to check, returns 0).
        seq_length: Tokens per sample.

    Raises:
        DataConfigError: A missing or damaged file, or a split too small for one sample.
    """
    from indexcache_train.data.builder import parse_blend

    if cfg.kind == "mock":
        return 0
    train, valid, prefix = cfg.blends()
    train_tokens = 0
    if prefix is not None:
        for p in parse_blend(prefix, "prefix")[0]:
            info = read_prefix(p)
            ranges = _split_ranges(cfg.split, info.num_documents)
            for name, rng in zip(("train", "valid", "test"), ranges):
                if rng is None:
                    continue
                tokens = int(info.doc_tokens[rng[0] : rng[1]].sum())
                where = f"{p}, {name} split (documents {rng[0]}..{rng[1]} of {info.num_documents})"
                _require_a_sample("prefix", where, tokens, seq_length)
                train_tokens += tokens if name == "train" else 0
        return train_tokens
    sources = [("train_prefixes", train), ("valid_prefixes", valid)]
    for field, items in [(f, s) for f, s in sources if s is not None]:
        for p in parse_blend(items, field)[0]:  # type: ignore[arg-type]
            info = read_prefix(p)
            _require_a_sample(field, p, info.num_tokens, seq_length)
            train_tokens += info.num_tokens if field == "train_prefixes" else 0
    return train_tokens
