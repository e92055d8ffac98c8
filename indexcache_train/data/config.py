"""``DataConfig``: the typed schema of the ``data`` config group.

Pure Python (no torch, no Megatron), so config validation can run before anything heavy imports.
Paths are plain strings so the dataclass works as an OmegaConf structured config; relative paths
are resolved against the working directory when the datasets are built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BUNDLED_CORPUS_DIR",
    "BUNDLED_TOKENIZER",
    "DataConfig",
    "DataConfigError",
    "DataNotFoundError",
    "check_repeat_span",
]

#: The embedded default corpus (``scripts/build_default_corpus.py`` writes it).
BUNDLED_CORPUS_DIR = Path(__file__).resolve().parents[2] / "data" / "default"
#: GPT-2 / r50k_base BPE ranks shipped with the bundled corpus.
BUNDLED_TOKENIZER = BUNDLED_CORPUS_DIR / "gpt2.tiktoken"

_KINDS = ("indexed", "mock")


class DataConfigError(ValueError):
    """Invalid data configuration; the message names the field and the fix."""


def check_repeat_span(span: int, seq_length: int) -> None:
    """Refuse a repeated span that cannot fit twice in a sample's ``seq_length + 1`` tokens.

    Raises:
        DataConfigError: ``2 * span > seq_length + 1``.
    """
    if 2 * span > seq_length + 1:
        raise DataConfigError(
            f"data.repeat_span={span} does not fit twice in a sample of seq_length={seq_length} "
            f"(+1 label token); use data.repeat_span <= {(seq_length + 1) // 2} or "
            "data.repeat_fraction=0"
        )


class DataNotFoundError(DataConfigError):
    """A data prefix whose files do not exist (on this machine: a dry run may be elsewhere)."""


@dataclass
class DataConfig:
    """Where training/validation tokens come from and how they are cut into samples."""

    kind: str = "indexed"
    """``"indexed"``: Megatron ``.bin/.idx`` datasets (``GPTDataset``); ``"mock"``: Megatron's
    synthetic ``MockGPTDataset`` (no files; smoke runs; the data sources below are ignored)."""

    train_prefixes: list[str] | None = None
    """Training data as in Megatron's ``--train-data-path``: one prefix, several prefixes (mixed
    in proportion to their sizes), or a blend ``[weight, prefix, weight, prefix, ...]``. Not
    with ``prefix``. When ``train_prefixes``, ``valid_prefixes`` and ``prefix`` are all None,
    the bundled corpus ``data/default/{train,val}`` is used."""

    valid_prefixes: list[str] | None = None
    """Validation data, same forms as ``train_prefixes``; None: no validation set."""

    prefix: list[str] | None = None
    """One prefix (or a blend) that ``split`` divides by document into train/valid/test, as
    Megatron's ``--data-path``. Not with ``train_prefixes``/``valid_prefixes``."""

    split: str = "98,2,0"
    """Train/valid/test weights of ``prefix``'s documents (Megatron ``--split``); only with
    ``prefix``."""

    tokenizer: str | None = None
    """A GPT-2 ``.tiktoken`` file or a Hugging Face tokenizer directory; it must be the one the
    data was tokenised with (its EOD id and vocab size are used). None: the bundled
    ``data/default/gpt2.tiktoken``."""

    seq_length: int | None = None
    """Tokens per sample. None: the model's sequence length, passed to ``build_datasets``; if
    set it must equal that (a pinned data length then fails loudly when the model changes)."""

    seed: int | None = None
    """Seed of the document/sample shuffles. None: the run seed passed to ``build_datasets``;
    set it to keep the data order fixed while the initialisation seed varies."""

    num_workers: int = 2
    """DataLoader worker processes per rank (0: load in the training process)."""

    cache_dir: str | None = None
    """Root of Megatron's sample-index cache (``.npy`` files). Must be on a filesystem every
    rank can read: global rank 0 writes the indices and the other ranks load them. None:
    ``$XDG_CACHE_HOME/indexcache_train/dataset_indices`` (``~/.cache/...``)."""

    eod_mask_loss: bool = False
    """Exclude positions whose input token is EOD from the loss (Megatron ``--eod-mask-loss``)."""

    pack_documents: bool = False
    """Treat the documents a sample packs (separated by EOD) as separate sequences: attention
    (and top-k) never crosses a document boundary and RoPE positions restart at each document.
    False: Megatron's default, a sample is one causal sequence across documents."""

    repeat_fraction: float = 0.0
    """Fraction of *training* samples that get spans of their own tokens repeated later in the
    sample (:mod:`indexcache_train.data.repeat_spans`), so long-range copying is learned in a
    few hundred steps; validation is never augmented. 0: off."""

    repeat_span: int = 64
    """Tokens per repeated span (with ``repeat_fraction > 0``); at most ``(seq_length + 1) / 2``."""

    repeat_count: int = 16
    """Repeated spans per augmented sample (with ``repeat_fraction > 0``)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check field combinations.

        Raises:
            DataConfigError: An invalid kind, a conflicting set of data sources or a bad
                ``repeat_*`` value.
        """
        if self.kind not in _KINDS:
            raise DataConfigError(f"data.kind must be one of {_KINDS}, got {self.kind!r}")
        if self.prefix is not None and (
            self.train_prefixes is not None or self.valid_prefixes is not None
        ):
            raise DataConfigError(
                "data.prefix (one dataset split by data.split) cannot be combined with "
                "data.train_prefixes/data.valid_prefixes; set one or the other"
            )
        if self.valid_prefixes is not None and self.train_prefixes is None:
            raise DataConfigError("data.valid_prefixes is set but data.train_prefixes is not")
        for name in ("train_prefixes", "valid_prefixes", "prefix"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or len(value) == 0):
                raise DataConfigError(
                    f"data.{name} must be a non-empty list (e.g. [path/prefix] or "
                    f"[0.7, a, 0.3, b]), got {value!r}"
                )
        if self.num_workers < 0:
            raise DataConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        self._validate_repeat()

    def _validate_repeat(self) -> None:
        if not 0.0 <= self.repeat_fraction <= 1.0:
            raise DataConfigError(
                f"data.repeat_fraction must be in [0, 1] (0: off), got {self.repeat_fraction}"
            )
        if self.repeat_span < 2:
            raise DataConfigError(f"data.repeat_span must be >= 2 tokens, got {self.repeat_span}")
        if self.repeat_count < 1:
            raise DataConfigError(f"data.repeat_count must be >= 1, got {self.repeat_count}")
        if self.repeat_fraction > 0 and self.pack_documents:
            raise DataConfigError(
                "data.repeat_fraction > 0 with data.pack_documents=true: a copy would cross "
                "document boundaries, where positions restart and attention stops; set "
                "data.repeat_fraction=0 or data.pack_documents=false"
            )

    def check_repeat_fits(self, seq_length: int) -> None:
        """With ``repeat_fraction > 0``, :func:`check_repeat_span` for ``seq_length``."""
        if self.repeat_fraction > 0:
            check_repeat_span(self.repeat_span, seq_length)

    @property
    def uses_bundled_corpus(self) -> bool:
        """True when no data source is set and the bundled corpus is used."""
        return self.kind == "indexed" and (
            self.train_prefixes is None and self.valid_prefixes is None and self.prefix is None
        )

    def blends(self) -> tuple[list[str] | None, list[str] | None, list[str] | None]:
        """``(train, valid, prefix)`` source lists after applying the bundled-corpus default."""
        if self.uses_bundled_corpus:
            return [str(BUNDLED_CORPUS_DIR / "train")], [str(BUNDLED_CORPUS_DIR / "val")], None
        return self.train_prefixes, self.valid_prefixes, self.prefix

    def tokenizer_path(self) -> str:
        """The tokenizer to load (the bundled GPT-2 ranks when unset)."""
        return self.tokenizer if self.tokenizer is not None else str(BUNDLED_TOKENIZER)
