"""Tokenise a JSONL corpus into a Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``).

Usage::

    python -m indexcache_train.data.preprocess --input docs.jsonl.xz --output-prefix out/docs \\
        --tokenizer data/default/gpt2.tiktoken --workers 4 --append-eod

One JSON object per line; the text is read from ``--json-key`` (default ``text``). Each line
becomes one document stored as one sequence, the layout Megatron-LM's
``tools/preprocess_data.py`` writes for GPT pretraining. Inputs may be plain, ``.xz`` or ``.gz``.
Tokenisation runs in a ``multiprocessing.Pool``; results are consumed in input order, so the
output does not depend on ``--workers``. The output appears only when every line succeeded
(see :mod:`indexcache_train.data.indexed_writer`). Blank lines are skipped; documents that
tokenise to nothing (empty text without ``--append-eod``) are skipped and counted.
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from indexcache_train.data.tokenizer import (
    TextTokenizer,
    TokenizerError,
    load_tokenizer,
    token_dtype,
)

__all__ = ["PreprocessError", "PreprocessStats", "main", "preprocess_jsonl"]

# Lines per task sent to a worker, and tasks per in-flight window. Windows bound memory:
# Pool.imap would read the whole input into its task queue ahead of the workers.
_CHUNKSIZE = 16
_WINDOW_TASKS = 8


class PreprocessError(ValueError):
    """Bad input for preprocessing; the message names the file, line and fix."""


@dataclass(frozen=True)
class PreprocessStats:
    """What one preprocessing run wrote."""

    documents: int
    tokens: int
    skipped_empty: int
    seconds: float
    dtype: str


# ------------------------------------------------------------------------------ worker side
_WORKER: tuple[TextTokenizer, str, str, bool] | None = None


def _set_state(tokenizer_path: str, input_name: str, json_key: str, append_eod: bool) -> None:
    global _WORKER
    _WORKER = (load_tokenizer(tokenizer_path), input_name, json_key, append_eod)


def _init_worker(tokenizer_path: str, input_name: str, json_key: str, append_eod: bool) -> None:
    # Fast HF tokenizers start Rust threads; with several processes that only oversubscribes.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _set_state(tokenizer_path, input_name, json_key, append_eod)


def _encode_line(item: tuple[int, str]) -> np.ndarray:
    assert _WORKER is not None, "_init_worker did not run"
    tokenizer, input_name, key, append_eod = _WORKER
    lineno, line = item
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise PreprocessError(f"{input_name}:{lineno}: not valid JSON ({err})") from None
    if not isinstance(record, dict) or key not in record:
        keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise PreprocessError(
            f"{input_name}:{lineno}: no key {key!r} (found: {keys}); pass --json-key with the "
            "field that holds the text"
        )
    text = record[key]
    if not isinstance(text, str):
        raise PreprocessError(
            f"{input_name}:{lineno}: {key!r} is a {type(text).__name__}, not a string"
        )
    ids = tokenizer.tokenize(text)
    if append_eod:
        ids.append(tokenizer.eod)
    # An array pickles as one buffer back to the main process; a list pickles int by int.
    return np.asarray(ids, dtype=token_dtype(tokenizer.vocab_size))


# ------------------------------------------------------------------------------ main side
def _open_text(path: Path) -> TextIO:
    if path.name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for every non-blank line, with readable decode errors."""
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield lineno, line
    except UnicodeDecodeError as err:
        raise PreprocessError(f"{path}:{lineno + 1}: not UTF-8 text ({err})") from None
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise PreprocessError(f"{path}: cannot read after line {lineno} ({err})") from None


def _batched(items: Iterable[tuple[int, str]], n: int) -> Iterator[list[tuple[int, str]]]:
    batch: list[tuple[int, str]] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_all(
    lines: Iterable[tuple[int, str]], workers: int, initargs: tuple[str, str, str, bool]
) -> Iterator[np.ndarray]:
    """Token ids per line, in input order."""
    if workers == 1:
        _set_state(*initargs)
        yield from map(_encode_line, lines)
        return
    window = workers * _CHUNKSIZE * _WINDOW_TASKS
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        # Two windows in flight: workers tokenise one while the main process writes the other.
        pending: deque[multiprocessing.pool.AsyncResult[list[np.ndarray]]] = deque()
        for batch in _batched(lines, window):
            pending.append(pool.map_async(_encode_line, batch, chunksize=_CHUNKSIZE))
            if len(pending) > 1:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


class _Progress:
    """A throttled stderr line: documents, tokens, docs/s, tokens/s."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.start = time.perf_counter()
        self.last = self.start

    def line(self, docs: int, tokens: int, *, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self.last < self.interval_s:
            return
        self.last = now
        dt = max(now - self.start, 1e-9)
        tag = "done" if final else "progress"
        print(
            f"[preprocess] {tag}: {docs:,} docs, {tokens:,} tokens, "
            f"{docs / dt:,.0f} docs/s, {tokens / dt:,.0f} tokens/s, {dt:.1f} s",
            file=sys.stderr,
            flush=True,
        )


def preprocess_jsonl(
    input_path: str | os.PathLike[str],
    output_prefix: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str],
    *,
    json_key: str = "text",
    workers: int = 1,
    append_eod: bool = False,
    overwrite: bool = False,
    log_interval_s: float = 5.0,
) -> PreprocessStats:
    """Tokenise ``input_path`` (JSONL, optionally .xz/.gz) into ``output_prefix``.bin/.idx.

    Args:
        input_path: JSON Lines file, one document per line.
        output_prefix: Output path prefix; parent directories are created.
        tokenizer: ``.tiktoken`` file or Hugging Face tokenizer directory.
        json_key: Field of each JSON object that holds the text.
        workers: Tokenisation processes (1: tokenise in this process).
        append_eod: Append the tokenizer's end-of-document id to every document.
        overwrite: Replace an existing dataset at ``output_prefix``.
        log_interval_s: Seconds between progress lines on stderr.

    Returns:
        Counts of what was written.

    Raises:
        PreprocessError: Missing input, bad line, bad key, bad ``workers``.
        TokenizerError: The tokenizer does not load.
        OutputExistsError: The output exists and ``overwrite`` is False.
    """
    from indexcache_train.data.indexed_writer import AtomicIndexedDatasetWriter

    src = Path(input_path)
    if not src.is_file():
        raise PreprocessError(f"input file not found: {src}; check --input")
    if workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {workers}")
    tok = load_tokenizer(tokenizer)  # fail on a bad tokenizer before any output exists
    dtype = token_dtype(tok.vocab_size)
    progress = _Progress(log_interval_s)
    skipped = 0
    initargs = (tok.path, str(src), json_key, append_eod)
    with AtomicIndexedDatasetWriter(output_prefix, dtype, overwrite=overwrite) as writer:
        for ids in _encode_all(_read_lines(src), workers, initargs):
            if ids.size == 0:
                skipped += 1
                continue
            writer.add_document(ids)
            progress.line(writer.num_documents, writer.num_tokens)
        progress.line(writer.num_documents, writer.num_tokens, final=True)
    if writer.num_documents == 0:
        # The (empty) dataset is written, but a training run on it would fail obscurely later.
        print(f"[preprocess] warning: {src} produced no documents", file=sys.stderr)
    return PreprocessStats(
        documents=writer.num_documents,
        tokens=writer.num_tokens,
        skipped_empty=skipped,
        seconds=time.perf_counter() - progress.start,
        dtype=np.dtype(dtype).name,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m indexcache_train.data.preprocess",
        description="Tokenise JSONL into a Megatron indexed dataset (PREFIX.bin / PREFIX.idx).",
    )
    p.add_argument("--input", required=True, help="JSON Lines file (.jsonl, .jsonl.xz, .jsonl.gz)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument(
        "--tokenizer", required=True, help="GPT-2 .tiktoken file or Hugging Face tokenizer dir"
    )
    p.add_argument("--json-key", default="text", help="field holding the text (default: text)")
    p.add_argument("--workers", type=int, default=1, help="tokenisation processes (default: 1)")
    p.add_argument("--append-eod", action="store_true", help="append EOD after each document")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx")
    p.add_argument("--log-interval", type=float, default=5.0, help="seconds between progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code (0 ok, 1 error, 130 interrupted)."""
    from indexcache_train.data.indexed_writer import OutputExistsError

    args = _parser().parse_args(argv)
    try:
        stats = preprocess_jsonl(
            args.input,
            args.output_prefix,
            args.tokenizer,
            json_key=args.json_key,
            workers=args.workers,
            append_eod=args.append_eod,
            overwrite=args.overwrite,
            log_interval_s=args.log_interval,
        )
    except (PreprocessError, TokenizerError, OutputExistsError) as err:
        print(f"[preprocess] error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[preprocess] interrupted; no output written", file=sys.stderr)
        return 130
    print(
        f"[preprocess] wrote {args.output_prefix}.bin/.idx: {stats.documents:,} docs, "
        f"{stats.tokens:,} tokens ({stats.dtype}), {stats.skipped_empty} empty skipped",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
