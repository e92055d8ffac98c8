"""``layout``: print a share-group-aware pipeline layout and its per-stage costs.

    python -m indexcache_train.tools layout --model glm5.2 --pp 8
    python -m indexcache_train.tools layout --model path/to/config.json --pp 4 --vpp 2
    python -m indexcache_train.tools layout --model glm5 --pp 8 --pattern FFSFSS...
    python -m indexcache_train.tools layout --model glm5.2 --pp 8 --last 8     # check a split

Without ``--layout`` / ``--first`` / ``--last`` / ``--even`` it prints the automatic layout;
with one of them it checks that split and exits with status 2 (naming the offending layers and
a valid layout) if it breaks a share group.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from indexcache_train.parallel import (
    EVEN,
    LayerCosts,
    PipelineLayout,
    PipelineLayoutError,
    layout_from_str,
    resolve_pipeline_layout,
    unit_costs,
)
from indexcache_train.schedule import IndexCacheSchedule, ScheduleError
from indexcache_train.tools.presets import PRESETS, ModelNotFoundError, load_model_config

_COST_FIELDS = {f.name for f in dataclasses.fields(LayerCosts)}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``layout`` verb."""
    p = subparsers.add_parser(
        "layout",
        help="pipeline layout that splits only at IndexCache share-group boundaries",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help=f"preset ({', '.join(PRESETS)}) or an HF config.json / its folder",
    )
    p.add_argument("--pp", type=int, required=True, help="pipeline_model_parallel_size")
    p.add_argument("--vpp", type=int, help="virtual_pipeline_model_parallel_size")
    sched = p.add_mutually_exclusive_group()
    sched.add_argument("--pattern", help="index_topk_pattern: one F/S per trunk (+MTP) layer")
    sched.add_argument("--freq", type=int, help="index_topk_freq (needs --offset)")
    p.add_argument("--offset", type=int, help="index_skip_topk_offset (with --freq)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--layout", help="check this pipeline_model_parallel_layout string")
    split.add_argument("--even", action="store_true", help="check Megatron's even split")
    p.add_argument("--first", type=int, help="check num_layers_in_first_pipeline_stage")
    p.add_argument("--last", type=int, help="check num_layers_in_last_pipeline_stage")
    p.add_argument(
        "--cost",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"override a LayerCosts field ({', '.join(sorted(_COST_FIELDS))})",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Resolve and print the layout; 2 (with the reason on stderr) when it is refused."""
    try:
        label, config = load_model_config(args.model)
        schedule = _schedule(args, config)
        costs = _costs(args.cost, config)
        layout = EVEN if args.even else args.layout
        resolved = resolve_pipeline_layout(
            schedule,
            args.pp,
            args.vpp,
            layout=layout,
            first=args.first,
            last=args.last,
            costs=costs,
        )
    except (ModelNotFoundError, ScheduleError, PipelineLayoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if resolved is None:
        chunks = (tuple(range(schedule.num_layers + schedule.num_mtp_layers)),)
        built = PipelineLayout(chunks, 1, schedule.num_layers)
    else:
        built = layout_from_str(resolved, schedule, args.pp, args.vpp)
    print(
        f"model: {label} ({schedule.num_layers} layers + {schedule.num_mtp_layers} MTP, "
        f"first_k_dense_replace={costs.first_k_dense_replace})"
    )
    print(f"schedule: {schedule.describe()}")
    print(f"pipeline_model_parallel_layout: {resolved}")
    print(format_table(schedule, built, costs))
    return 0


def format_table(schedule: IndexCacheSchedule, layout: PipelineLayout, costs: LayerCosts) -> str:
    """One row per chunk (layers, Full/Shared counts, cost), then the balance summary."""
    header = ("stage", "vstage", "layers", "n", "Full", "Shared", "cost")
    rows = [header]
    chunk_costs = layout.chunk_costs(schedule, costs)
    pp = layout.pipeline_model_parallel_size
    for c, chunk in enumerate(layout.chunks):
        full = sum(schedule.is_full(i) for i in chunk)
        rows.append(
            (
                str(c % pp),
                str(c // pp),
                _describe_chunk(schedule, layout, c),
                str(len(chunk)),
                str(full),
                str(len(chunk) - full),
                f"{chunk_costs[c]:.2f}",
            )
        )
    widths = [max(len(row[k]) for row in rows) for k in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    heaviest = max(unit_costs(schedule, costs))
    spread = max(chunk_costs) - min(chunk_costs)
    lines.append(
        f"max {max(chunk_costs):.2f}  mean {sum(chunk_costs) / len(chunk_costs):.2f}  "
        f"min {min(chunk_costs):.2f}  (max - min {spread:.2f}; heaviest share group, "
        f"embedding/MTP/loss included: {heaviest:.2f})"
    )
    return "\n".join(lines)


def _describe_chunk(schedule: IndexCacheSchedule, layout: PipelineLayout, c: int) -> str:
    """E.g. ``E 0-9`` or ``74-77 m78 L``: embedding, trunk range, MTP layers, loss."""
    trunk = [i for i in layout.chunks[c] if not schedule.is_mtp(i)]
    mtp = [i for i in layout.chunks[c] if schedule.is_mtp(i)]
    parts = ["E"] if c == 0 else []
    if trunk:
        parts.append(f"{trunk[0]}-{trunk[-1]}" if len(trunk) > 1 else str(trunk[0]))
    parts += [f"m{i}" for i in mtp]
    if c == layout.num_chunks - 1:
        parts.append("L")
    return " ".join(parts)


def _schedule(args: argparse.Namespace, config: dict[str, Any]) -> IndexCacheSchedule:
    n = int(config["num_hidden_layers"])
    num_mtp = int(config.get("num_nextn_predict_layers") or 0)
    if args.pattern is not None:
        return IndexCacheSchedule.from_pattern(args.pattern, n, num_mtp)
    if args.freq is not None:
        if args.offset is None:
            raise ScheduleError(
                "--freq needs --offset (index_skip_topk_offset: HF/vLLM/SGLang assume 2, "
                "Megatron 1); e.g. --freq 4 --offset 3 for GLM-5.2."
            )
        return IndexCacheSchedule.from_freq_offset(n, args.freq, args.offset, num_mtp)
    if args.offset is not None:
        raise ScheduleError("--offset only applies with --freq.")
    return IndexCacheSchedule.from_hf_config(config)


def _costs(overrides: list[str], config: dict[str, Any]) -> LayerCosts:
    values: dict[str, float | int] = {
        "first_k_dense_replace": int(config.get("first_k_dense_replace") or 0)
    }
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or name not in _COST_FIELDS:
            raise PipelineLayoutError(
                f"--cost {item!r}: expected NAME=VALUE with NAME one of {sorted(_COST_FIELDS)}."
            )
        try:
            values[name] = int(value) if name == "first_k_dense_replace" else float(value)
        except ValueError:
            raise PipelineLayoutError(f"--cost {item!r}: {value!r} is not a number.") from None
    return LayerCosts(**values)
