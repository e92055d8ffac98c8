"""Pipeline layouts that respect IndexCache share groups (issue #6): the guard and the resolver.

Rule (facts section 6): a Shared layer reuses the top-k of its source, the nearest preceding Full
layer, and top-k never crosses a pipeline boundary. So every model chunk must hold the source of
each Shared layer it holds; a Shared MTP layer's source is a trunk layer, which must then sit in
the MTP chunk (the last one). Megatron-Core 0.19.2 checks trunk layers per chunk only when it
builds them, and only for freq/offset schedules; this guard runs on the schedule before anything
is built and covers F/S patterns and MTP too.

Every way Megatron can be told a split is covered, each turned into a :class:`PipelineLayout`:
its even split, ``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage``,
and an explicit ``pipeline_model_parallel_layout`` string. Virtual pipeline stages are supported
under the same rule: each virtual chunk is checked like a stage (Megatron builds, and runs, each
chunk separately). :func:`resolve_pipeline_layout` is what the trainer calls.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from indexcache_train.parallel.auto_layout import auto_layout, check_sizes
from indexcache_train.parallel.layout_model import (
    LayerCosts,
    PipelineLayout,
    PipelineLayoutError,
    layer_name,
)
from indexcache_train.parallel.splits import layout_from_str, megatron_split
from indexcache_train.schedule import IndexCacheSchedule

#: ``layout`` values of :func:`resolve_pipeline_layout` that are not layout strings.
AUTO = "auto"
EVEN = "even"


def resolve_pipeline_layout(
    schedule: IndexCacheSchedule,
    pp_size: int,
    vpp_size: int | None = None,
    layout: str | None = None,
    first: int | None = None,
    last: int | None = None,
    costs: LayerCosts | None = None,
) -> str | None:
    """The ``pipeline_model_parallel_layout`` string to put into ``TransformerConfig``.

    Call it before building anything. Whatever the split was given as, the answer is one explicit
    layout string, so Megatron's ``num_layers_in_first/last_pipeline_stage`` stay unset.

    Args:
        schedule: The model's IndexCache schedule (trunk and MTP layers).
        pp_size: ``pipeline_model_parallel_size``.
        vpp_size: ``virtual_pipeline_model_parallel_size`` (``None`` or 1: no interleaving).
        layout: ``None`` or ``"auto"``: the cost-balanced share-group layout; ``"even"``:
            Megatron's default even split (checked); otherwise a ``pipeline_model_parallel_layout``
            string (checked, returned unchanged).
        first: ``num_layers_in_first_pipeline_stage`` (checked; not with a layout string).
        last: ``num_layers_in_last_pipeline_stage`` (checked; not with a layout string).
        costs: Per-layer cost model for the auto layout and the error's proposal.

    Returns:
        The layout string, or ``None`` when ``pp_size`` is 1 (nothing to split).

    Raises:
        PipelineLayoutError: Invalid sizes, or a split that puts a Shared layer (or a Shared MTP
            layer) on another chunk than its source; the message names them and proposes a layout.
    """
    check_sizes(pp_size, vpp_size)
    explicit = layout not in (None, AUTO, EVEN)
    split_given = first is not None or last is not None
    if split_given and (explicit or layout == AUTO):
        raise PipelineLayoutError(
            f"layout={layout!r} cannot be combined with num_layers_in_first_pipeline_stage / "
            "num_layers_in_last_pipeline_stage (Megatron refuses a layout string beside them too). "
            "Fix: give one of them."
        )
    if pp_size == 1:
        if split_given:
            raise PipelineLayoutError(
                "num_layers_in_first/last_pipeline_stage need pipeline_model_parallel_size > 1."
            )
        if explicit:
            layout_from_str(layout, schedule, 1)  # still refuse a wrong layer count
        return None
    if not explicit and layout != EVEN and not split_given:
        return auto_layout(schedule, pp_size, vpp_size, costs).to_megatron()
    try:
        if explicit:
            given = f"pipeline_model_parallel_layout={layout!r}"
            candidate = layout_from_str(layout, schedule, pp_size, vpp_size)
        else:
            given = _describe_split(first, last)
            candidate = megatron_split(schedule, pp_size, vpp_size, first, last)
    except PipelineLayoutError as err:
        # Megatron could not build this split either; say so and offer one that works.
        raise PipelineLayoutError(
            f"{err} {_proposal(schedule, pp_size, vpp_size, costs)}"
        ) from None
    check_layout(schedule, candidate, costs, given=given)
    return layout if explicit else candidate.to_megatron()


@dataclass(frozen=True)
class Violation:
    """A Shared layer whose source (the Full layer whose top-k it reuses) is on another chunk."""

    layer: int
    source: int
    chunk: int
    source_chunk: int


def find_violations(schedule: IndexCacheSchedule, layout: PipelineLayout) -> list[Violation]:
    """Every Shared layer (trunk or MTP) that ``layout`` puts on another chunk than its source.

    Args:
        schedule: The model's IndexCache schedule.
        layout: A layout for the same number of trunk and MTP layers.

    Returns:
        Violations in layer order; empty when the layout respects every share group.
    """
    total = schedule.num_layers + schedule.num_mtp_layers
    built = sum(len(chunk) for chunk in layout.chunks)
    if layout.num_layers != schedule.num_layers or built != total:
        raise PipelineLayoutError(
            f"the layout builds {layout.num_layers} trunk layers ({built} with MTP) but the "
            f"schedule has {schedule.num_layers} ({total} with MTP)."
        )
    out = []
    for c, chunk in enumerate(layout.chunks):
        for i in chunk:
            source = schedule.source(i)
            if source != i and layout.chunk_of(source) != c:
                out.append(Violation(i, source, c, layout.chunk_of(source)))
    return out


def check_layout(
    schedule: IndexCacheSchedule,
    layout: PipelineLayout,
    costs: LayerCosts | None = None,
    given: str = "the pipeline layout",
) -> None:
    """Refuse ``layout`` if it splits a share group; the error proposes a valid layout.

    Args:
        schedule: The model's IndexCache schedule.
        layout: The split to check.
        costs: Cost model for the proposed layout.
        given: How the user wrote the split, quoted at the start of the error.

    Raises:
        PipelineLayoutError: Naming each offending layer, its source and both chunks.
    """
    violations = find_violations(schedule, layout)
    if not violations:
        return
    by_boundary: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for v in violations:
        by_boundary[v.chunk, v.source, v.source_chunk].append(v.layer)
    lines = [
        f"  - {layout.chunk_name(c)}: {_names(schedule, layers)} "
        f"{'reuses' if len(layers) == 1 else 'reuse'} the top-k of layer {source} on "
        f"{layout.chunk_name(sc)}"
        for (c, source, sc), layers in by_boundary.items()
    ]
    starts = ", ".join(map(str, schedule.trunk_full_layers[:24]))
    if len(schedule.trunk_full_layers) > 24:
        starts += ", ..."
    raise PipelineLayoutError(
        f"{given} (pipeline_model_parallel_size={layout.pipeline_model_parallel_size}, "
        f"virtual_pipeline_model_parallel_size={layout.virtual_pipeline_model_parallel_size}) "
        "puts Shared layers on another pipeline stage than their source; IndexCache top-k never "
        "crosses a pipeline boundary:\n"
        + "\n".join(lines)
        + f"\nFix: start every stage on a Full layer ({starts}). "
        + _proposal(
            schedule,
            layout.pipeline_model_parallel_size,
            layout.virtual_pipeline_model_parallel_size,
            costs,
        )
    )


def _names(schedule: IndexCacheSchedule, layers: list[int]) -> str:
    """``layers 20, 21`` / ``layer 20`` / ``MTP layer 78`` for an error message."""
    trunk = [i for i in layers if not schedule.is_mtp(i)]
    parts = [layer_name(schedule, i) for i in layers if schedule.is_mtp(i)]
    if trunk:
        parts.insert(0, ("layers " if len(trunk) > 1 else "layer ") + ", ".join(map(str, trunk)))
    return " and ".join(parts)


def _proposal(
    schedule: IndexCacheSchedule, pp_size: int, vpp_size: int | None, costs: LayerCosts | None
) -> str:
    """The auto layout for these sizes, phrased as the fix (or why there is none)."""
    try:
        proposal = auto_layout(schedule, pp_size, vpp_size, costs).to_megatron()
    except PipelineLayoutError as err:
        return f"No valid layout exists for these sizes: {err}"
    return (
        f'Valid, cost-balanced layout for these sizes: pipeline_model_parallel_layout="{proposal}" '
        "(python -m indexcache_train.tools layout prints its per-stage costs)."
    )


def _describe_split(first: int | None, last: int | None) -> str:
    if first is None and last is None:
        return "Megatron's even split"
    return f"num_layers_in_first_pipeline_stage={first}, num_layers_in_last_pipeline_stage={last}"
