"""Long-context evaluation math: loss by position bucket, passkey and copy probes (no model).

Used by the ``eval`` verb (:mod:`indexcache_train.tools.eval_cli`), which runs the models and
feeds the per-token scores here. Everything is built from token ids: probes are generated
offline (no network, no text at scoring time) and scored teacher-forced.

Conventions:

* A forward over tokens ``x[0..S]`` has ``S`` query rows; row ``p`` predicts ``x[p+1]`` from the
  ``p + 1`` tokens ``x[0..p]`` of its document, its *context length*. ``nll_S[p]`` and
  ``pred_S[p]`` (argmax) belong to row ``p``.
* Position bucket ``i`` holds the rows whose context length ``c`` (counted from the start of
  the row's document) satisfies ``edges[i] <= c < edges[i + 1]`` (the last bucket is open).
  A row whose target lies in the next document, or past the end of the data, is excluded.
* Passkey probe (after the "passkey retrieval" test of Mohtashami & Jaggi, 2023): filler text,
  a needle ``prefix KEY suffix`` inserted after ``round(depth * F)`` of the ``F`` filler tokens,
  filler again, a question, then ``KEY`` as the answer. Scored on the answer tokens: mean NLL,
  token accuracy and exact match (every key token is the greedy prediction).
* Copy probe: filler with a random span of ``L`` tokens at ``s1`` and again at ``s2 = s1 + d``
  (``d`` = distance, start to start), the second copy ending the probe. Scored on the second
  copy's tokens after its first (the first has no cue): mean NLL and token accuracy; and, as
  the no-cue control, the mean NLL of the same tokens in the first copy (``nll_first``): the
  gap between the two is what the earlier occurrence is worth (0 for a model that cannot copy).

Shape legend: B batch, S query rows, V vocabulary, N buckets.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it runs: the CLI's --help stays torch-free
    import torch

#: Default bucket edges (context lengths): 0-1K, 1K-4K, 4K-16K, 16K-32K, 32K-64K, 64K-128K, 128K+.
DEFAULT_EDGES = (0, 1024, 4096, 16384, 32768, 65536, 131072)
#: The classic passkey filler ("The grass is green ..."), a question and the needle's wording.
FILLER_TEXT = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
NEEDLE_PREFIX_TEXT = " The pass key is"
NEEDLE_SUFFIX_TEXT = ". Remember it."
QUESTION_TEXT = " What is the pass key? The pass key is"


class ProbeError(ValueError):
    """A probe that cannot be built with the requested sizes; the message says which."""


# ---------------------------------------------------------------------- position buckets
def parse_edges(text: str) -> tuple[int, ...]:
    """``"0,1K,4K,16K"`` -> ``(0, 1024, 4096, 16384)`` (``K`` = 1024, ``M`` = 1024^2); strictly
    increasing, starting at 0."""
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        scale = {"K": 1024, "M": 1024 * 1024}.get(part[-1:], 1)
        digits = part[:-1] if scale > 1 else part
        if not digits.isdigit():
            raise ValueError(f"bucket edge {part!r} is not an integer (optionally with K or M)")
        out.append(int(digits) * scale)
    if not out or out[0] != 0 or any(b <= a for a, b in pairwise(out)):
        raise ValueError(f"bucket edges {text!r} must start at 0 and increase strictly")
    return tuple(out)


def _short(n: int) -> str:
    for unit, size in (("M", 1024 * 1024), ("K", 1024)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def bucket_labels(edges: Sequence[int]) -> list[str]:
    """``["0-1K", "1K-4K", ..., "128K+"]`` for the buckets of ``edges``."""
    labels = [f"{_short(a)}-{_short(b)}" for a, b in pairwise(edges)]
    return [*labels, f"{_short(edges[-1])}+"]


def document_rows(doc_lengths: Sequence[int], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(context_S, valid_S)`` for one row of ``rows`` query positions over documents of the
    given lengths laid end to end (a packed row, or a single document with ``[len]``).

    ``context_S[p]`` = context length of row p within its document; ``valid_S[p]`` = its target
    ``x[p+1]`` is in the same document (rows past the last document are invalid).
    """
    import torch

    context = torch.zeros(rows, dtype=torch.long)
    valid = torch.zeros(rows, dtype=torch.bool)
    start = 0
    for length in doc_lengths:
        end = min(start + length, rows + 1)  # tokens [start, end) of this document are present
        if end <= start:
            break
        p = torch.arange(start, min(end, rows))
        context[p] = p - start + 1
        valid[p] = p + 1 < end
        start += length
    return context, valid


def bucket_sums(
    nll_BS: torch.Tensor, context_BS: torch.Tensor, valid_BS: torch.Tensor, edges: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of NLL [N] float64, rows [N] int64)`` per position bucket (sum, then divide, so
    documents and batches accumulate into a row-weighted mean)."""
    import torch

    edges_t = torch.tensor(list(edges), dtype=torch.long, device=context_BS.device)
    bucket = torch.bucketize(context_BS, edges_t, right=True) - 1  # edges[0] = 0 <= context
    bucket = bucket[valid_BS]
    n = len(edges)
    sums = torch.zeros(n, dtype=torch.float64, device=nll_BS.device)
    sums.index_add_(0, bucket, nll_BS[valid_BS].double())
    counts = torch.bincount(bucket, minlength=n)
    return sums, counts.long()


# ---------------------------------------------------------------------- per-token scores
def token_scores(logits_SV: torch.Tensor, targets_S: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(nll_S, pred_S)``: NLL of each target under fp32 log-softmax, and the argmax id."""
    import torch

    logp = torch.log_softmax(logits_SV.float(), dim=-1)
    return -logp.gather(-1, targets_S[:, None].long())[:, 0], logits_SV.argmax(-1)


# ---------------------------------------------------------------------- probes
@dataclass(frozen=True)
class ProbeVocab:
    """The token ids probes are made of (from a tokenizer, or synthetic ids for toy models).

    A tokenizer encodes a key whole (``" 71432"``: BPE merges digits, so per-digit ids would not
    be what the model reads in text); a synthetic vocabulary uses one id per digit.
    """

    filler: tuple[int, ...]
    needle_prefix: tuple[int, ...]
    needle_suffix: tuple[int, ...]
    question: tuple[int, ...]
    #: Ids random copy spans are drawn from.
    span_pool: tuple[int, ...]
    #: Synthetic: the id of each digit 0-9; empty when ``encode`` is used.
    digit_ids: tuple[int, ...] = ()
    #: A tokenizer's ``str -> ids`` (keys are encoded with it), or None (synthetic digits).
    encode: Callable[[str], list[int]] | None = None

    def key_ids(self, digits: str) -> list[int]:
        if self.encode is not None:
            return list(self.encode(" " + digits))
        return [self.digit_ids[int(c)] for c in digits]

    def max_id(self) -> int:
        parts = (self.filler, self.needle_prefix, self.needle_suffix, self.question)
        most = max(max(p) for p in (*parts, self.span_pool, self.digit_ids or (0,)))
        return max(most, max(self.key_ids("0123456789")))

    @classmethod
    def from_tokenizer(cls, tok: object, vocab_size: int) -> ProbeVocab:
        """Texts encoded with ``tok`` (a :class:`~indexcache_train.data.TextTokenizer`); spans
        drawn from the ids both the tokenizer and the model know, EOD excluded."""
        enc = tok.tokenize  # type: ignore[attr-defined]
        top = min(vocab_size, int(tok.vocab_size))  # type: ignore[attr-defined]
        pool = tuple(i for i in range(top) if i != int(tok.eod))  # type: ignore[attr-defined]
        return cls(
            filler=tuple(enc(FILLER_TEXT)),
            needle_prefix=tuple(enc(NEEDLE_PREFIX_TEXT)),
            needle_suffix=tuple(enc(NEEDLE_SUFFIX_TEXT)),
            question=tuple(enc(QUESTION_TEXT)),
            span_pool=pool,
            encode=enc,
        )

    @classmethod
    def synthetic(cls, vocab_size: int, seed: int = 0) -> ProbeVocab:
        """Disjoint random ids: 10 digits, a 6-id needle prefix, 3-id suffix, 8-id question, a
        24-id filler "sentence"; the rest are the span pool. Needs ``vocab_size >= 64``."""
        if vocab_size < 64:
            raise ProbeError(f"a synthetic probe vocabulary needs >= 64 ids, not {vocab_size}")
        ids = list(range(vocab_size))
        random.Random(seed).shuffle(ids)
        cut = [0, 10, 16, 19, 27, 51]
        parts = [tuple(ids[a:b]) for a, b in pairwise(cut)]
        return cls(
            digit_ids=parts[0],
            needle_prefix=parts[1],
            needle_suffix=parts[2],
            question=parts[3],
            filler=parts[4],
            span_pool=tuple(ids[cut[-1] :]),
        )


@dataclass(frozen=True)
class Probe:
    """One probe: ``tokens`` (a forward runs on ``tokens[:-1]``) and the scored target range."""

    kind: str  # "passkey" | "copy"
    param: float  # passkey: depth in [0, 1]; copy: distance in tokens
    tokens: tuple[int, ...]
    #: Scored targets are ``tokens[target_start : target_start + target_len]``.
    target_start: int
    target_len: int
    #: passkey: where the key sits in the needle; copy: start of the first copy.
    anchor: int


def _cycle(ids: Sequence[int], n: int) -> list[int]:
    return [ids[i % len(ids)] for i in range(n)]


def passkey_probe(
    length: int, depth: float, vocab: ProbeVocab, seed: int, digits: int = 5
) -> Probe:
    """A passkey probe of ``length`` tokens, its key (``digits`` random digits from ``seed``)
    after ``round(depth * F)`` of the ``F`` filler tokens."""
    if not 0.0 <= depth <= 1.0:
        raise ProbeError(f"passkey depth {depth} is outside [0, 1]")
    rng = random.Random(seed)
    key = vocab.key_ids("".join(str(rng.randrange(10)) for _ in range(digits)))
    needle = [*vocab.needle_prefix, *key, *vocab.needle_suffix]
    tail = [*vocab.question, *key]
    fill = length - len(needle) - len(tail)
    if fill < 1:
        raise ProbeError(
            f"a passkey probe needs more than {len(needle) + len(tail)} tokens; got {length}"
        )
    offset = rng.randrange(len(vocab.filler))  # vary the filler phase between samples
    filler = _cycle(vocab.filler[offset:] + vocab.filler[:offset], fill)
    at = round(depth * fill)
    tokens = [*filler[:at], *needle, *filler[at:], *tail]
    return Probe(
        "passkey", depth, tuple(tokens), length - len(key), len(key), at + len(vocab.needle_prefix)
    )


def default_copy_distances(span: int, length: int) -> list[int]:
    """Powers of 4 from 16 at which a ``span``-token copy fits in ``length`` tokens without the
    two copies overlapping (distance >= span)."""
    return [4**e for e in range(2, 12) if 4**e >= span and 4**e + span <= length]


def copy_probe(length: int, distance: int, span: int, vocab: ProbeVocab, seed: int) -> Probe:
    """A copy probe of ``length`` tokens: a random ``span``-token sequence from the span pool,
    repeated ``distance`` tokens later (start to start), the second copy ending the probe."""
    if span < 2 or distance < span or distance + span > length:
        raise ProbeError(
            f"a copy probe needs span >= 2, distance >= span and distance + span <= length; got "
            f"span {span}, distance {distance}, length {length}"
        )
    rng = random.Random(seed)
    chunk = [rng.choice(vocab.span_pool) for _ in range(span)]
    s2 = length - span
    s1 = s2 - distance
    tokens = _cycle(vocab.filler, length)
    tokens[s1 : s1 + span] = chunk
    tokens[s2:] = chunk
    return Probe("copy", distance, tuple(tokens), s2 + 1, span - 1, s1)


def score_probe(probe: Probe, nll_S: torch.Tensor, pred_S: torch.Tensor) -> dict[str, float]:
    """``{"nll", "acc", "exact"}`` (copy probes also ``"nll_first"``) of a probe from the
    per-row scores of a forward over ``probe.tokens[:-1]`` (row ``p`` predicts token ``p + 1``)."""
    import torch

    rows = slice(probe.target_start - 1, probe.target_start - 1 + probe.target_len)
    targets = torch.tensor(probe.tokens[probe.target_start :][: probe.target_len])
    hit = pred_S[rows].cpu() == targets
    out = {
        "nll": float(nll_S[rows].double().mean()),
        "acc": float(hit.double().mean()),
        "exact": float(bool(hit.all())),
    }
    if probe.kind == "copy":  # the same span tokens in the first copy, predicted without a cue
        out["nll_first"] = float(
            nll_S[probe.anchor : probe.anchor + probe.target_len].double().mean()
        )
    return out
