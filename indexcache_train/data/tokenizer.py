"""Text tokenizers for preprocessing and for Megatron's GPT datasets, loaded offline.

Two sources are supported:
  * a ``.tiktoken`` BPE ranks file. Only the GPT-2 / ``r50k_base`` ranks are recognised (by
    sha256), because a ranks file carries neither the pre-tokenisation regex nor the special
    tokens; for those ranks they are tiktoken's ``r50k_pat_str`` and ``<|endoftext|>`` = 50256.
  * a Hugging Face tokenizer directory, loaded with ``AutoTokenizer.from_pretrained(dir,
    local_files_only=True)``.

:class:`TextTokenizer` is what Megatron-Core 0.19.2's ``GPTDatasetConfig`` / ``GPTDataset`` read
(``vocab_size``, ``eod``, ``pad``, ``eos`` and ``unique_identifiers``, which feeds the index-cache
hash); it is not a ``MegatronTokenizerBase`` because Megatron's own tiktoken/HF classes need a
``tokenizer_metadata.json`` and renumber tiktoken special tokens.

This module imports neither torch nor Megatron (nor transformers unless an HF directory is
loaded), so preprocessing workers start fast under any multiprocessing start method.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "GPT2_EOT",
    "GPT2_PAT_STR",
    "R50K_SHA256",
    "TextTokenizer",
    "TokenizerError",
    "load_tokenizer",
    "token_dtype",
]

#: tiktoken 0.14 ``tiktoken_ext.openai_public.r50k_pat_str`` (GPT-2's regex in a faster form).
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
#: ``<|endoftext|>`` in GPT-2 / r50k_base.
GPT2_EOT = 50256
#: sha256 of ``r50k_base.tiktoken`` (tiktoken's ``expected_hash``; equals corpus-v1's gpt2.tiktoken).
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

_HINT = "pass a GPT-2 .tiktoken ranks file or a Hugging Face tokenizer directory"


class TokenizerError(ValueError):
    """The tokenizer path cannot be loaded; the message names the path and the fix."""


def token_dtype(vocab_size: int) -> type[np.unsignedinteger] | type[np.signedinteger]:
    """The token dtype of ``.bin`` files for ``vocab_size`` ids.

    Same rule as Megatron-Core 0.19.2 ``GPTDatasetConfig.token_dtype_code``: uint16 while every
    id fits in it, else int32.
    """
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TextTokenizer:
    """Encode/decode plus the special-token facts Megatron's GPT datasets need.

    Args:
        path: The ``.tiktoken`` file or HF directory it was loaded from (kept for provenance and
            for the dataset cache key).
        kind: ``"tiktoken"`` or ``"hf"``.
        encode: ``str -> list[int]`` without special tokens.
        decode: ``list[int] -> str``.
        vocab_size: Number of ids (special tokens included).
        eod: End-of-document id appended after each document.
        pad: Padding id, or -1 when the tokenizer has none (Megatron's "no pad" value).
    """

    def __init__(
        self,
        path: str,
        kind: str,
        encode: Callable[[str], list[int]],
        decode: Callable[[list[int]], str],
        vocab_size: int,
        eod: int,
        pad: int = -1,
    ) -> None:
        self.path = path
        self.kind = kind
        self._encode = encode
        self._decode = decode
        self._vocab_size = int(vocab_size)
        self._eod = int(eod)
        # A pad equal to EOD would make Megatron mask every EOD label (it warns and drops the pad).
        self._pad = -1 if pad == eod else int(pad)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        return self._encode(text)

    def detokenize(self, ids: list[int]) -> str:
        """Text of ``ids``."""
        return self._decode(list(ids))

    @property
    def vocab_size(self) -> int:
        """Number of token ids (special tokens included, no model padding)."""
        return self._vocab_size

    @property
    def eod(self) -> int:
        """End-of-document id (Megatron's ``tokenizer.eod``)."""
        return self._eod

    @property
    def eos(self) -> int:
        """Alias of :attr:`eod`; Megatron's pad-collision check reads it."""
        return self._eod

    @property
    def pad(self) -> int:
        """Padding id, -1 when there is none."""
        return self._pad

    @property
    def unique_identifiers(self) -> OrderedDict[str, Any]:
        """What Megatron hashes into the dataset index-cache key."""
        return OrderedDict(
            {
                "class": f"{type(self).__module__}.{type(self).__qualname__}",
                "kind": self.kind,
                "path": self.path,
                "vocab_size": self._vocab_size,
                "eod": self._eod,
                "pad": self._pad,
            }
        )

    def __reduce__(self) -> tuple[Callable[[str], TextTokenizer], tuple[str]]:
        # The encode/decode closures do not pickle; DataLoader workers under spawn re-load.
        return load_tokenizer, (self.path,)

    def __repr__(self) -> str:
        return f"TextTokenizer(kind={self.kind!r}, path={self.path!r}, vocab_size={self._vocab_size}, eod={self._eod})"


def _load_tiktoken(path: Path) -> TextTokenizer:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    try:
        digest = _sha256(path)
    except OSError as err:
        raise TokenizerError(f"{path}: cannot read ({err}); {_HINT}") from err
    if digest != R50K_SHA256:
        raise TokenizerError(
            f"{path}: unknown .tiktoken ranks (sha256 {digest[:12]}...). A ranks file does not "
            "carry its regex or special tokens, so only GPT-2/r50k_base ranks "
            f"(sha256 {R50K_SHA256[:12]}...) are supported; use a Hugging Face tokenizer "
            "directory for other vocabularies"
        )
    # The digest pins the content, so parsing cannot fail past this point.
    ranks = load_tiktoken_bpe(str(path))
    enc = tiktoken.Encoding(
        name="r50k_base",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT},
    )
    return TextTokenizer(
        str(path), "tiktoken", enc.encode_ordinary, enc.decode, enc.n_vocab, GPT2_EOT
    )


def _load_hf(path: Path) -> TextTokenizer:
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise TokenizerError(
            f"{path}: no tokenizer.json or tokenizer_config.json in this directory; {_HINT}"
        )
    # transformers takes ~5 s to import; only pay for it when an HF directory is used.
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        raise TokenizerError(
            f"{path}: Hugging Face tokenizer directory does not load offline ({err}); {_HINT}"
        ) from err
    eod = tok.eos_token_id
    if eod is None:
        raise TokenizerError(
            f"{path}: the tokenizer has no eos_token; set one in tokenizer_config.json "
            "(it is the end-of-document token appended by --append-eod and used by the datasets)"
        )
    # Whole documents are encoded at once; the per-model length limit only matters to models.
    tok.model_max_length = 1 << 62
    pad = tok.pad_token_id if tok.pad_token_id is not None else -1
    return TextTokenizer(
        str(path),
        "hf",
        lambda text: tok.encode(text, add_special_tokens=False),
        lambda ids: tok.decode(ids),
        len(tok),
        eod,
        pad,
    )


def load_tokenizer(path: str | os.PathLike[str]) -> TextTokenizer:
    """Load a ``.tiktoken`` ranks file or a Hugging Face tokenizer directory, offline.

    Args:
        path: A GPT-2/r50k ``*.tiktoken`` file or a directory with HF tokenizer files.

    Returns:
        The tokenizer.

    Raises:
        TokenizerError: The path is missing, of an unknown kind, or does not load.
    """
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        return _load_hf(p)
    if not p.exists():
        raise TokenizerError(f"tokenizer not found: {path}; {_HINT}")
    if p.suffix == ".tiktoken":
        return _load_tiktoken(p)
    raise TokenizerError(f"{path}: neither a .tiktoken file nor a directory; {_HINT}")
