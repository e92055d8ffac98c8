"""Atomic writing of Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``).

Megatron-Core's ``IndexedDatasetBuilder`` writes straight to its final paths, so an error or a
kill half-way leaves a truncated ``.bin`` and a missing or stale ``.idx`` that a later run may
happily open. :class:`AtomicIndexedDatasetWriter` lets the builder write temporary files next to
the target and renames them into place only when everything succeeded; on any error (Ctrl-C
included) the temporaries are deleted and existing outputs are left untouched.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from types import TracebackType

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

__all__ = ["AtomicIndexedDatasetWriter", "OutputExistsError"]


class OutputExistsError(FileExistsError):
    """The output prefix already holds a dataset and overwriting was not asked for."""


class AtomicIndexedDatasetWriter:
    """Context manager: add documents, and ``PREFIX.bin/.idx`` appear only on success.

    Args:
        prefix: Output path prefix (``PREFIX.bin`` / ``PREFIX.idx``); its directory is created.
        dtype: Token dtype of the ``.bin`` (see :func:`~indexcache_train.data.tokenizer.token_dtype`).
        overwrite: Replace an existing dataset at ``prefix``; otherwise refuse up front.

    Raises:
        OutputExistsError: ``PREFIX.bin`` or ``PREFIX.idx`` exists and ``overwrite`` is False.
    """

    def __init__(
        self, prefix: str | os.PathLike[str], dtype: type[np.integer], *, overwrite: bool
    ) -> None:
        self.prefix = Path(prefix)
        self.bin_path = Path(f"{self.prefix}.bin")
        self.idx_path = Path(f"{self.prefix}.idx")
        if not overwrite and (self.bin_path.exists() or self.idx_path.exists()):
            raise OutputExistsError(
                f"{self.prefix}.bin/.idx already exist; pass --overwrite (overwrite=True) "
                "or choose another output prefix"
            )
        self.dtype = dtype
        self.num_documents = 0
        self.num_tokens = 0
        self._tmp: list[Path] = []
        self._builder: IndexedDatasetBuilder | None = None

    def _temp_path(self, suffix: str) -> Path:
        # Same directory as the target so os.replace is a same-filesystem (atomic) rename; not
        # mkstemp, whose 0600 mode would survive the rename and hide the data from other users.
        name = f".{self.prefix.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}.tmp"
        path = self.prefix.parent / name
        self._tmp.append(path)
        return path

    def __enter__(self) -> AtomicIndexedDatasetWriter:
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = self._temp_path(".bin")
        self._tmp_idx = self._temp_path(".idx")
        self._builder = IndexedDatasetBuilder(str(self._tmp_bin), dtype=self.dtype)
        return self

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        """Append one document as one sequence (Megatron's GPT layout)."""
        assert self._builder is not None, "use AtomicIndexedDatasetWriter as a context manager"
        arr = np.asarray(tokens, dtype=self.dtype)
        self._builder.add_document(arr, [arr.size])
        self.num_documents += 1
        self.num_tokens += int(arr.size)

    def _commit(self) -> None:
        assert self._builder is not None
        self._builder.finalize(str(self._tmp_idx))
        # Drop the old .idx first: a crash between the two renames then leaves a .bin without an
        # .idx (IndexedDataset refuses it) rather than a new .bin under a stale .idx.
        self.idx_path.unlink(missing_ok=True)
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)
        self._tmp.clear()

    def _cleanup(self) -> None:
        if self._builder is not None and not self._builder.data_file.closed:
            self._builder.data_file.close()
        for path in self._tmp:
            path.unlink(missing_ok=True)
        self._tmp.clear()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            self._cleanup()
