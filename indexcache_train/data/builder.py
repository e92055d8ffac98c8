"""Train/validation datasets from a :class:`DataConfig`, through Megatron-Core's dataset builder.

Every rank calls :func:`build_datasets`. How Megatron-Core 0.19.2's
``BlendedMegatronDatasetBuilder`` coordinates ranks (read from its source):

* torch.distributed **not** initialised: ``is_built_on_rank`` is never consulted; the process
  builds (or loads from the cache) every dataset itself, with no barriers.
* torch.distributed initialised: the builder runs ``torch.distributed.barrier()`` once per
  split (and once more per multi-prefix blend), so **all ranks must call it**, in the same
  order. Global rank 0 builds first and writes the sample indices to ``path_to_cache``; the
  other ranks then load them from there (so the cache must be on a shared filesystem).
  ``is_built_on_rank`` decides which ranks get a dataset (others get None) and must be True on
  global rank 0.

We build on every rank by default: each data-parallel rank reads its own micro-batches (see
:mod:`indexcache_train.data.loader`) and tensor/pipeline peers read identical ones, so the
training loop needs no TP broadcast of batches. The cost is one mmap of the ``.bin`` per rank.
Megatron-LM's alternative (first/last pipeline stage and TP rank 0 only, then broadcast) can be
had by passing ``is_built_on_rank``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset

from indexcache_train.data.checks import check_data_sources
from indexcache_train.data.config import DataConfig, DataConfigError, DataNotFoundError
from indexcache_train.data.repeat_spans import RepeatSpans
from indexcache_train.data.tokenizer import TextTokenizer, load_tokenizer

__all__ = ["Dataset", "build_datasets", "default_cache_root", "parse_blend"]

Blend = tuple[list[str], list[float] | None]
#: What the builder returns per split: a GPTDataset, or a BlendedDataset over several; the
#: training split wrapped in :class:`RepeatSpans` when ``repeat_fraction > 0``.
Dataset = GPTDataset | BlendedDataset | RepeatSpans


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_blend(items: list[str], field: str) -> Blend:
    """Megatron's blend list -> ``(absolute prefixes, weights or None)``, checked.

    Args:
        items: ``[prefix, ...]`` or ``[weight, prefix, weight, prefix, ...]``.
        field: Config field name for error messages.

    Returns:
        The prefixes (made absolute, so the cache key does not depend on the working directory)
        and their weights (None: mix in proportion to dataset sizes).

    Raises:
        DataConfigError: Mixed weighted/unweighted items or bad weights.
        DataNotFoundError: A missing dataset.
    """
    items = [str(x).strip() for x in items]
    weighted = len(items) % 2 == 0 and all(_is_float(w) for w in items[0::2])
    if weighted:
        weights = [float(w) for w in items[0::2]]
        prefixes = items[1::2]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataConfigError(
                f"data.{field}: weights must be >= 0 with a positive sum, got {weights}"
            )
    else:
        weights, prefixes = None, items
    for p in prefixes:
        if _is_float(p):
            raise DataConfigError(
                f"data.{field}: {p!r} looks like a weight; a blend is [weight, prefix, weight, "
                f"prefix, ...] with a weight before every prefix, got {items}"
            )
        if not IndexedDataset.exists(p):
            raise DataNotFoundError(
                f"data.{field}: no dataset at {p!r} ({p}.bin and {p}.idx); create it with "
                "`python -m indexcache_train.data.preprocess` or scripts/build_default_corpus.py"
            )
    return [os.path.abspath(p) for p in prefixes], weights


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/indexcache_train/dataset_indices`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "indexcache_train" / "dataset_indices"


def _cache_dir(cfg: DataConfig, blends: list[Blend]) -> str:
    """A cache directory keyed by the content of every ``.idx`` involved.

    Megatron's cache key hashes the prefix *path*, seed, sizes and tokenizer, not the data, so
    re-tokenising into the same prefix would silently reuse stale indices. Megatron's indices
    are a pure function of the ``.idx`` contents (sequence lengths) and that key, so hashing the
    ``.idx`` files closes the gap.
    """
    root = Path(cfg.cache_dir) if cfg.cache_dir is not None else default_cache_root()
    if cfg.kind == "mock":
        return str(root / "mock")
    digest = hashlib.sha256()
    for prefixes, _ in blends:
        for prefix in prefixes:
            with open(f"{prefix}.idx", "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return str(root / digest.hexdigest()[:16])


def _every_rank() -> bool:
    return True


def _gpt_config(
    cfg: DataConfig, tokenizer: TextTokenizer, seq_length: int, seed: int
) -> GPTDatasetConfig:
    train, valid, prefix = cfg.blends()
    blend = blend_per_split = None
    if cfg.kind == "indexed":
        if prefix is not None:
            blend = parse_blend(prefix, "prefix")
        else:
            assert train is not None  # DataConfig.validate guarantees it
            blend_per_split = [
                parse_blend(train, "train_prefixes"),
                parse_blend(valid, "valid_prefixes") if valid is not None else None,
                None,
            ]
    per_split = [b for b in blend_per_split or [] if b is not None]
    sources = [blend] if blend is not None else per_split
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        # Megatron rejects a split next to blend_per_split, and forces "1,1,1" for mock data.
        split=cfg.split if blend is not None else None,
        path_to_cache=_cache_dir(cfg, sources),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=cfg.eod_mask_loss,
        # Our attention builds its own causal mask; a dense [1, S, S] mask per sample is waste.
        create_attention_mask=False,
    )


def build_datasets(
    cfg: DataConfig,
    *,
    seq_length: int,
    train_samples: int,
    valid_samples: int,
    seed: int,
    is_built_on_rank: Callable[[], bool] | None = None,
) -> tuple[Dataset | None, Dataset | None]:
    """Build the train and validation datasets; call it on every rank.

    Samples are dicts of ``tokens``, ``labels`` (int64, ``[seq_length]``), ``loss_mask``
    (float32) and ``position_ids`` (int64), as Megatron's ``GPTDataset`` produces them; a
    weighted blend (a ``BlendedDataset``) adds ``dataset_id``, the index of the source. With
    ``cfg.repeat_fraction > 0`` the training split (never the validation one) repeats spans
    (:class:`~indexcache_train.data.repeat_spans.RepeatSpans`, seeded by the data seed).

    Args:
        cfg: The data config.
        seq_length: The model's sequence length (tokens per sample).
        train_samples: Samples the run will draw (``train_iters * global_batch_size``); the
            dataset repeats epochs to provide at least this many. A resume must build the same
            number of epochs: a different epoch count reshuffles everything.
        valid_samples: Validation samples to provide (at least one epoch is built).
        seed: The run seed; the data seed unless ``cfg.seed`` is set.
        is_built_on_rank: With torch.distributed initialised, whether this rank gets datasets
            (must be True on global rank 0). Default: every rank.

    Returns:
        ``(train, valid)``; ``valid`` is None without validation data, and both are None on
        ranks where ``is_built_on_rank()`` is False.

    Raises:
        DataConfigError: Bad data sources (missing, damaged, or too small for one sample: see
            :mod:`indexcache_train.data.checks`) or a ``cfg.seq_length`` that differs from
            ``seq_length``, or a ``cfg.repeat_span`` that does not fit twice in a sample.
        TokenizerError: The tokenizer does not load.
    """
    cfg.validate()
    if cfg.seq_length is not None and cfg.seq_length != seq_length:
        raise DataConfigError(
            f"data.seq_length={cfg.seq_length} differs from the model's seq_length={seq_length}; "
            "unset data.seq_length or make them equal"
        )
    cfg.check_repeat_fits(seq_length)
    if train_samples < 1:
        raise DataConfigError(f"train_samples must be >= 1, got {train_samples}")
    check_data_sources(cfg, seq_length)
    tokenizer = load_tokenizer(cfg.tokenizer_path())
    data_seed = cfg.seed if cfg.seed is not None else seed
    gpt_cfg = _gpt_config(cfg, tokenizer, seq_length, data_seed)
    cls = MockGPTDataset if cfg.kind == "mock" else GPTDataset
    # Test size 0, not None: Megatron asserts "size None => no weights" for weighted blends.
    builder = BlendedMegatronDatasetBuilder(
        cls, [train_samples, valid_samples, 0], is_built_on_rank or _every_rank, gpt_cfg
    )
    train_ds, valid_ds, _ = builder.build()
    if cfg.repeat_fraction > 0 and train_ds is not None:
        train_ds = RepeatSpans(
            train_ds,
            seq_length=seq_length,
            seed=data_seed,
            fraction=cfg.repeat_fraction,
            span=cfg.repeat_span,
            count=cfg.repeat_count,
        )
    return train_ds, valid_ds
