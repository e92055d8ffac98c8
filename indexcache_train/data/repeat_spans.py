"""Repeated spans: a training-set augmentation that makes long-range copying worth learning.

Plain text rarely requires copying a span seen thousands of tokens earlier, so a small model
trained for a few hundred steps learns no induction and a copy probe cannot rank anything. This
wrapper copies, in a seeded fraction of samples, spans of a sample's own tokens to later
positions at log-uniform distances (``data.repeat_fraction`` / ``repeat_span`` /
``repeat_count``). Validation data is never wrapped (:func:`~indexcache_train.data.builder.
build_datasets` wraps the training split only).

Each sample's augmentation depends on ``(seed, index)`` alone, so it is the same whatever the
worker, rank or resume point that loads it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from indexcache_train.data.config import check_repeat_span

__all__ = ["RepeatSpans"]


class RepeatSpans(Dataset):
    """Wrap a GPT dataset; some samples get spans of their own tokens repeated later on.

    Args:
        inner: A dataset of dicts with ``tokens`` and ``labels`` (int64 ``[S]``, labels the
            tokens shifted by one), ``loss_mask`` (float32 ``[S]``) and other keys, which pass
            through unchanged.
        seq_length: ``S``, tokens per sample.
        seed: The data seed; with the sample index it decides everything about a sample.
        fraction: Probability that a sample is augmented (0: never, 1: always).
        span: Tokens per repeated span.
        count: Spans per augmented sample.

    Raises:
        DataConfigError: ``2 * span > seq_length + 1`` (a span and its copy do not fit).
    """

    def __init__(
        self, inner: Dataset, *, seq_length: int, seed: int, fraction: float, span: int, count: int
    ) -> None:
        check_repeat_span(span, seq_length)
        self.inner = inner
        self.seed, self.fraction, self.span, self.count = seed, fraction, span, count

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        sample = self.inner[idx]
        rng = np.random.default_rng([self.seed, int(idx)])
        if rng.random() >= self.fraction:
            return sample
        return {**sample, **_repeat(sample, rng, self.span, self.count)}


def _repeat(
    sample: dict[str, Any], rng: np.random.Generator, span: int, count: int
) -> dict[str, torch.Tensor]:
    """New ``tokens``/``labels``/``loss_mask`` with ``count`` spans copied (inputs untouched)."""
    tokens_S, labels_S = sample["tokens"], sample["labels"]
    # The sample is one (S + 1)-token sequence cut into inputs seq[:-1] and labels seq[1:]; copy
    # in it so that a copied span's last token is also the label of the position before.
    seq_N = torch.cat([tokens_S, labels_S[-1:]])
    loss_mask_S = sample["loss_mask"].clone()
    n, s = seq_N.numel(), tokens_S.numel()
    lo, hi = math.log(span), math.log(n - span + 1)  # d in [span, n - span], log-uniform
    for _ in range(count):
        d = min(int(math.exp(rng.uniform(lo, hi))), n - span)
        dst = int(rng.integers(d, n - span, endpoint=True))
        src = dst - d
        seq_N[dst : dst + span] = seq_N[src : src + span]
        # loss_mask[p] belongs to input token p (eod_mask_loss masks EOD inputs): it moves along.
        end = min(dst + span, s)
        loss_mask_S[dst:end] = loss_mask_S[src : src + end - dst]
    return {"tokens": seq_N[:-1].clone(), "labels": seq_N[1:].clone(), "loss_mask": loss_mask_S}
