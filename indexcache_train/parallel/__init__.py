"""Parallel wiring that can be decided before anything is built (no torch, no Megatron imports).

Public API (issue #6, pipeline layouts that respect IndexCache share groups):

* :func:`resolve_pipeline_layout`: the ``pipeline_model_parallel_layout`` string the trainer puts
  into ``TransformerConfig`` (auto layout, or a user's split checked by the guard).
* :func:`auto_layout`, :func:`check_layout`, :func:`find_violations`: the pieces behind it.
* :class:`LayerCosts`, :class:`PipelineLayout`, :class:`PipelineLayoutError`.
"""

from indexcache_train.parallel.auto_layout import (
    auto_layout,
    partition_min_max,
    share_units,
    unit_costs,
)
from indexcache_train.parallel.layout_format import format_layout, parse_layout_str
from indexcache_train.parallel.layout_model import LayerCosts, PipelineLayout, PipelineLayoutError
from indexcache_train.parallel.pipeline_layout import (
    AUTO,
    EVEN,
    Violation,
    check_layout,
    find_violations,
    resolve_pipeline_layout,
)
from indexcache_train.parallel.splits import layout_from_str, megatron_split

__all__ = [
    "AUTO",
    "EVEN",
    "LayerCosts",
    "PipelineLayout",
    "PipelineLayoutError",
    "Violation",
    "auto_layout",
    "check_layout",
    "find_violations",
    "format_layout",
    "layout_from_str",
    "megatron_split",
    "parse_layout_str",
    "partition_min_max",
    "resolve_pipeline_layout",
    "share_units",
    "unit_costs",
]
