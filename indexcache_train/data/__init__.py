"""The data layer: preprocessing, the bundled corpus, Megatron datasets and resumable loading.

Modules (one concern each):
  * ``tokenizer``: offline tiktoken / Hugging Face tokenizers with what Megatron's datasets need.
  * ``indexed_writer``: atomic writing of Megatron ``.bin/.idx`` files.
  * ``preprocess``: ``python -m indexcache_train.data.preprocess`` (JSONL -> ``.bin/.idx``).
  * ``config``: :class:`DataConfig`, the typed schema of the ``data`` config group.
  * ``checks``: :func:`check_data_sources`, every ``.bin/.idx`` whole and every split non-empty.
  * ``builder``: :func:`build_datasets` through Megatron's ``BlendedMegatronDatasetBuilder``.
  * ``repeat_spans``: :class:`RepeatSpans`, the opt-in repeated-spans training augmentation.
  * ``loader``: :func:`build_dataloader`, deterministic and resumable from ``consumed_samples``.

Names are re-exported lazily: importing ``indexcache_train.data.tokenizer`` (preprocessing
workers) or ``.config`` (config validation) must not pull in torch and Megatron (~5 s).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "config",
    "DataConfigError": "config",
    "DataNotFoundError": "config",
    "BUNDLED_CORPUS_DIR": "config",
    "BUNDLED_TOKENIZER": "config",
    "TextTokenizer": "tokenizer",
    "TokenizerError": "tokenizer",
    "load_tokenizer": "tokenizer",
    "build_datasets": "builder",
    "RepeatSpans": "repeat_spans",
    "check_data_sources": "checks",
    "build_dataloader": "loader",
    "MicroBatchSampler": "loader",
    "preprocess_jsonl": "preprocess",
    "PreprocessError": "preprocess",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
