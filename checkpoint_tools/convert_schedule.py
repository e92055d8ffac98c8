"""``convert-schedule``: rewrite an HF checkpoint for another IndexCache schedule, streaming.

    python -m checkpoint_tools convert-schedule --hf HF_DIR --out HF_DIR2 \\
        (--index-topk-freq N [--index-skip-topk-offset M] | --pattern FSS...) \\
        [--init-missing-indexers {from-source,random}] [--drop-shared-indexers] \\
        [--overwrite] [--shard-size 5GB]

What changes and what does not:

* A layer that becomes Shared loses its ``self_attn.indexer.*`` tensors (FP8 scales included).
* A layer that becomes Full keeps its own indexer when it had one; otherwise it gets a copy of
  its former source's indexer (``from-source``, the default: the indexer whose top-k it used) or
  a fresh one (``random``, transformers' init; see :mod:`checkpoint_tools.indexer_init`).
* Dense-MLA inputs (``deepseek_v3``, ``glm4_moe_lite``) have no indexers: every Full layer gets a
  fresh one, the model_type becomes its DSA family's (:mod:`indexcache_train.model.families`), and
  ``index_topk`` / ``index_head_dim`` / ``index_n_heads`` come from flags or that family's defaults.
  This is the starting point of the warm-up stage.
* Every other tensor is copied byte for byte (dtype, FP8 data and scales untouched); the routed
  experts keep the form they were stored in.
* config.json gets the schedule keys exactly as ``IndexCacheSchedule.to_hf_config()`` writes
  them; ``rope_interleave`` / ``indexer_rope_interleave`` / ``index_share_for_mtp_iteration`` are
  carried over (an absent interleave key is written with the value transformers implements).
* ``deepseek_v32`` cannot hold Shared layers in transformers 5.17 (its DeepseekV32Config has no
  ``indexer_types`` and builds an indexer on every layer), and relabelling it ``glm_moe_dsa``
  would silently switch the indexer RoPE from half-split to interleaved. A Shared schedule for a
  DeepSeek model is therefore refused unless ``--allow-transformers-incompatible``: the model_type
  stays ``deepseek_v32`` and the result is for engines and trainers that honour the schedule keys
  (transformers would load it with randomly initialised indexers on the Shared layers).

Everything is checked before the first byte is written: input headers and sizes, the input's
tensor set against its config, the requested schedule, and the planned output against the
layout its new config implies; the finished output is validated again before it is renamed into
place.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from checkpoint_tools.errors import OutputExistsError
from checkpoint_tools.hf_io import HFCheckpoint, check_output_dir
from checkpoint_tools.layout import family_of
from checkpoint_tools.schedule_plan import (
    FROM_SOURCE,
    RANDOM,
    SCHEDULE_KEYS,
    ConversionPlan,
    IndexerDims,
    ScheduleRequest,
    execute_plan,
    plan_conversion,
)
from indexcache_train.model.families import FAMILIES

__all__ = [
    "SCHEDULE_KEYS",
    "ConversionPlan",
    "IndexerDims",
    "ScheduleRequest",
    "add_arguments",
    "convert_schedule",
    "execute_plan",
    "main",
    "plan_conversion",
]


def convert_schedule(
    hf_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    request: ScheduleRequest,
    *,
    init_missing_indexers: str | None = None,
    drop_shared_indexers: bool = False,
    index_dims: IndexerDims | None = None,
    allow_transformers_incompatible: bool = False,
    overwrite: bool = False,
    shard_size: int | str = "5GB",
    seed: int = 0,
    progress: bool = False,
) -> ConversionPlan:
    """Plan, check and write; returns the executed plan. See the module docstring."""
    src, out = Path(hf_dir), Path(out_dir)
    check_output_dir(out, overwrite)  # before any work: refusing late wastes an hour on GLM-5
    if out.resolve() == src.resolve():
        raise OutputExistsError(
            "output is the input", file=str(out), fix="write to a new directory"
        )
    plan = plan_conversion(
        HFCheckpoint(src),
        request,
        init_missing_indexers=init_missing_indexers,
        drop_shared_indexers=drop_shared_indexers,
        index_dims=index_dims,
        allow_transformers_incompatible=allow_transformers_incompatible,
    )
    execute_plan(
        plan, out, overwrite=overwrite, shard_size=shard_size, seed=seed, progress=progress
    )
    return plan


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register this verb's flags."""
    parser.add_argument("--hf", required=True, type=Path, help="input HF checkpoint directory")
    parser.add_argument("--out", required=True, type=Path, help="output directory (must not exist)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--index-topk-freq", type=int, help="every N-th layer Full (1 = all Full)")
    which.add_argument(
        "--pattern", help="F/S per layer, e.g. FFSFSSSF... (optionally + MTP layers)"
    )
    parser.add_argument(
        "--index-skip-topk-offset",
        type=int,
        help="offset of the periodic rule (required with freq > 1)",
    )
    parser.add_argument(
        "--init-missing-indexers",
        choices=(FROM_SOURCE, RANDOM),
        help="indexer for a layer that becomes Full: copy its former source's (default) or init fresh",
    )
    parser.add_argument(
        "--drop-shared-indexers",
        action="store_true",
        help="drop indexers the input stores on layers its own config makes Shared",
    )
    parser.add_argument(
        "--index-topk", type=int, help="dense-MLA input only: top-k of the new indexers"
    )
    parser.add_argument("--index-head-dim", type=int, help="dense-MLA input only")
    parser.add_argument("--index-n-heads", type=int, help="dense-MLA input only")
    parser.add_argument(
        "--allow-transformers-incompatible",
        action="store_true",
        help="write Shared layers for deepseek_v32 although transformers cannot load them",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for fresh indexers")
    parser.add_argument("--shard-size", default="5GB", help="max shard size (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Run the verb; errors propagate to the dispatcher, which prints them."""
    dims_given = [args.index_topk, args.index_head_dim, args.index_n_heads]
    index_dims = None
    if any(v is not None for v in dims_given):
        family = family_of(HFCheckpoint(args.hf).config)
        defaults = FAMILIES[family.dsa_model_type].index_defaults or (2048, 128, 32)
        index_dims = IndexerDims(*(v if v is not None else d for v, d in zip(dims_given, defaults)))
    plan = convert_schedule(
        args.hf,
        args.out,
        ScheduleRequest(args.index_topk_freq, args.index_skip_topk_offset, args.pattern),
        init_missing_indexers=args.init_missing_indexers,
        drop_shared_indexers=args.drop_shared_indexers,
        index_dims=index_dims,
        allow_transformers_incompatible=args.allow_transformers_incompatible,
        overwrite=args.overwrite,
        shard_size=args.shard_size,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(plan.describe())
    print(f"wrote {args.out}")
    return 0
