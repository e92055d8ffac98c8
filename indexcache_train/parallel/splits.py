"""Turn each way Megatron-Core 0.19.2 is told a pipeline split into a :class:`PipelineLayout`.

* :func:`megatron_split`: no layout string; the even split, or the uneven one given by
  ``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage``. Mirrors
  ``get_num_layers_to_build`` / ``get_transformer_layer_offset`` (transformer_block.py,
  transformer_layer.py), MTP on the last stage as ``mtp_on_this_rank`` does without a layout.
* :func:`layout_from_str`: an explicit ``pipeline_model_parallel_layout`` string.

Both refuse what Megatron would refuse (with our wording) before the share-group guard runs.
"""

from __future__ import annotations

from indexcache_train.parallel.layout_format import (
    DECODER,
    EMBEDDING,
    LOSS,
    MTP,
    LayoutFormatError,
    parse_layout_str,
)
from indexcache_train.parallel.layout_model import (
    PipelineLayout,
    PipelineLayoutError,
    chunks_from_sizes,
)
from indexcache_train.schedule import IndexCacheSchedule


def megatron_split(
    schedule: IndexCacheSchedule,
    pp_size: int,
    vpp_size: int | None = None,
    first: int | None = None,
    last: int | None = None,
) -> PipelineLayout:
    """The layout Megatron builds from ``num_layers_in_first/last_pipeline_stage`` (or evenly).

    Args:
        schedule: Gives the trunk and MTP layer counts.
        pp_size: ``pipeline_model_parallel_size`` (>= 2).
        vpp_size: ``virtual_pipeline_model_parallel_size`` (``None``: no interleaving).
        first: ``num_layers_in_first_pipeline_stage`` (``None``: like the middle stages).
        last: ``num_layers_in_last_pipeline_stage`` (``None``: like the middle stages).

    Raises:
        PipelineLayoutError: Where Megatron's split arithmetic does not work out.
    """
    n, vpp = schedule.num_layers, vpp_size or 1
    for key, value in (("first", first), ("last", last)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise PipelineLayoutError(
                f"num_layers_in_{key}_pipeline_stage must be an integer >= 1, got {value!r}."
            )
    middle_stages = pp_size - (first is not None) - (last is not None)
    middle_layers = n - (first or 0) - (last or 0)
    if middle_layers < 0 or (middle_stages == 0) != (middle_layers == 0):
        raise PipelineLayoutError(
            f"{middle_layers} layers are left for {middle_stages} middle pipeline stages "
            f"({n} layers, first={first}, last={last}, pp={pp_size})."
        )
    if middle_stages and middle_layers % middle_stages:
        what = "an even split" if middle_stages == pp_size else "the middle stages"
        raise PipelineLayoutError(
            f"Megatron cannot build {what}: {middle_layers} layers do not divide into "
            f"{middle_stages} stages (first={first}, last={last})."
        )
    per_middle = middle_layers // middle_stages if middle_stages else 0
    per_rank = [per_middle] * pp_size
    per_rank[0] = per_middle if first is None else first
    per_rank[-1] = per_middle if last is None else last
    uneven = [r for r, count in enumerate(per_rank) if count % vpp]
    if uneven:
        raise PipelineLayoutError(
            f"pipeline stage {uneven[0]} has {per_rank[uneven[0]]} layers, not divisible by "
            f"virtual_pipeline_model_parallel_size={vpp}."
        )
    # Megatron's flattened chunk order: virtual stage 0 of every rank, then virtual stage 1, ...
    sizes = [per_rank[r] // vpp for _ in range(vpp) for r in range(pp_size)]
    return PipelineLayout(chunks_from_sizes(sizes, n, schedule.num_mtp_layers), pp_size, n)


def layout_from_str(
    layout: str, schedule: IndexCacheSchedule, pp_size: int, vpp_size: int | None = None
) -> PipelineLayout:
    """Read a ``pipeline_model_parallel_layout`` string for ``schedule``'s layer counts.

    Stricter than Megatron in one way: the embedding must open chunk 0 and the loss must close
    the last chunk (Megatron only checks the flattened first/last entries, so an empty chunk 0
    would move the embedding off pipeline rank 0).

    Raises:
        PipelineLayoutError: Bad syntax, a chunk count that is not ``pp_size * vpp_size``, or
            layer counts that do not match the model.
    """
    try:
        rows = parse_layout_str(layout)
    except LayoutFormatError as err:
        raise PipelineLayoutError(str(err)) from None
    _check_chunk_count(layout, len(rows), pp_size, vpp_size)
    flat = "".join("".join(row) for row in rows)
    _check_counts(layout, flat, schedule)
    if not (rows[0][:1] == [EMBEDDING] and rows[-1][-1:] == [LOSS]):
        raise PipelineLayoutError(
            f"pipeline_model_parallel_layout {layout!r} must start with the embedding 'E' (first "
            "stage) and end with the loss 'L' (last stage)."
        )
    n, next_trunk, next_mtp, chunks = schedule.num_layers, 0, schedule.num_layers, []
    for row in rows:
        t, m = row.count(DECODER), row.count(MTP)
        chunks.append(
            tuple(range(next_trunk, next_trunk + t)) + tuple(range(next_mtp, next_mtp + m))
        )
        next_trunk, next_mtp = next_trunk + t, next_mtp + m
    return PipelineLayout(tuple(chunks), pp_size, n)


def _check_chunk_count(layout: str, chunks: int, pp_size: int, vpp_size: int | None) -> None:
    want = pp_size * (vpp_size or 1)
    if chunks % pp_size or (vpp_size is not None and chunks != want):
        raise PipelineLayoutError(
            f"pipeline_model_parallel_layout {layout!r} has {chunks} stages ('|'-separated) but "
            f"pipeline_model_parallel_size={pp_size}"
            + (f" x virtual_pipeline_model_parallel_size={vpp_size}" if vpp_size else "")
            + f" needs {want if vpp_size else f'a multiple of {pp_size}'}."
        )


def _check_counts(layout: str, flat: str, schedule: IndexCacheSchedule) -> None:
    n, m = schedule.num_layers, schedule.num_mtp_layers
    problems = []
    if flat.count(DECODER) != n:
        problems.append(f"{flat.count(DECODER)} transformer layers 't' (the model has {n})")
    if flat.count(MTP) != m:
        problems.append(f"{flat.count(MTP)} MTP layers 'm' (the model has {m})")
    for char, name in ((EMBEDDING, "embedding 'E'"), (LOSS, "loss 'L'")):
        if flat.count(char) != 1:
            problems.append(f"{flat.count(char)} {name} (needs exactly 1)")
    if MTP in flat and DECODER in flat[flat.index(MTP) :]:
        problems.append("a transformer layer after an MTP layer (MTP layers come last)")
    if problems:
        raise PipelineLayoutError(
            f"pipeline_model_parallel_layout {layout!r} has " + "; ".join(problems) + "."
        )
