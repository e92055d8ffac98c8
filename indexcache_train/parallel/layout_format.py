"""Megatron-Core's ``pipeline_model_parallel_layout`` string format, read and written in pure Python.

The grammar is Megatron-Core 0.19.2's ``PipelineParallelLayerLayout.parse_str_to_list``
(megatron/core/transformer/pipeline_parallel_layer_layout.py):

* one character per layer: ``E`` embedding, ``t`` transformer (decoder) layer, ``m`` MTP layer,
  ``L`` loss (output layer + cross entropy);
* ``|`` separates model chunks, listed in Megatron's flattened order: chunk ``c`` is virtual
  stage ``c // pp`` of pipeline rank ``c % pp`` (all ranks of virtual stage 0 first);
* ``x*n`` repeats one character, ``(...)*n`` repeats a parenthesised group (no nesting);
* commas are cosmetic.

Example: ``"Et*3|(tt|)*2,t*3mL"`` is 4 chunks: ``[E t t t] [t t] [t t] [t t t m L]``.

We re-implement the grammar (instead of importing Megatron) so the pipeline guard runs before
torch or Megatron is imported; a unit test parses the same strings with Megatron's own parser and
requires identical results.
"""

from __future__ import annotations

import re

EMBEDDING = "E"
DECODER = "t"
MTP = "m"
LOSS = "L"
LAYER_CHARS = frozenset({EMBEDDING, DECODER, MTP, LOSS})

_GROUP_REPEAT = re.compile(r"\(([^()]+)\)\*(\d+)")
_CHAR_REPEAT = re.compile(r"(.)\*(\d+)")


class LayoutFormatError(ValueError):
    """A ``pipeline_model_parallel_layout`` string that Megatron-Core would not parse."""


def parse_layout_str(layout: str) -> list[list[str]]:
    """Unroll a layout string into one list of layer characters per model chunk.

    Args:
        layout: A Megatron ``pipeline_model_parallel_layout`` string, e.g. ``"Et*3|(tt|)*2,tmL"``.

    Returns:
        Chunks in Megatron's flattened (virtual-stage-major) order, e.g.
        ``[["E", "t", "t", "t"], ["t", "t"], ["t", "t"], ["t", "m", "L"]]``.

    Raises:
        LayoutFormatError: On an unknown character or unbalanced parentheses.
    """
    if not isinstance(layout, str):
        raise LayoutFormatError(
            f"pipeline_model_parallel_layout must be a string, got {type(layout).__name__}."
        )
    text = layout.replace(",", "")  # commas are cosmetic; spaces are not allowed
    # Groups first, then single characters, the same order Megatron unrolls them in, so
    # "(t*2|)*3" expands its group before the inner "t*2".
    text = _GROUP_REPEAT.sub(lambda m: m.group(1) * int(m.group(2)), text)
    text = _CHAR_REPEAT.sub(lambda m: m.group(1) * int(m.group(2)), text)
    chunks = [list(chunk) for chunk in text.split("|")]
    for chunk in chunks:
        bad = sorted({c for c in chunk if c not in LAYER_CHARS})
        if bad:
            raise LayoutFormatError(
                f"pipeline_model_parallel_layout {layout!r} has unknown character(s) {bad} "
                "(parentheses may not be nested). Use E (embedding), t (transformer layer), "
                "m (MTP layer), L (loss), '|' between stages, 'x*n' and '(...)*n' to repeat."
            )
    return chunks


def format_layout(chunks: list[list[str]] | list[str]) -> str:
    """Write chunks of layer characters as a compact layout string (``t*n`` for runs).

    Args:
        chunks: One sequence of layer characters (or one string) per model chunk, in Megatron's
            flattened order.

    Returns:
        E.g. ``"Et*3|t*2|t*2|t*3mL"``; ``parse_layout_str`` gives ``chunks`` back.
    """
    return "|".join(_format_chunk("".join(chunk)) for chunk in chunks)


def _format_chunk(chunk: str) -> str:
    parts = []
    for match in re.finditer(r"(.)\1*", chunk):
        run, char = match.group(0), match.group(1)
        parts.append(char if len(run) == 1 else f"{char}*{len(run)}")
    return "".join(parts)
