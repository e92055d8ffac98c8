"""``serve-config``: print the IndexCache schedule overrides for SGLang, vLLM and transformers.

    python -m indexcache_train.tools serve-config --hf /ckpt/GLM-5.2-freq4 --engine sglang
    python -m indexcache_train.tools serve-config --model glm5 --pattern FFSFSSSF...
    python -m indexcache_train.tools serve-config --model glm5.2 \\
        --index-topk-freq 2 --index-skip-topk-offset 1 --out serve/

The schedule comes from ``--hf``'s config.json or the ``--model`` preset, unless
``--index-topk-freq``/``--index-skip-topk-offset`` or ``--pattern`` give another one (e.g. a
training-free pattern for a checkpoint that has an indexer on every layer). One engine prints
its JSON on one line (ready for ``"$(...)"``); ``--engine all`` prints one object keyed by engine.
``--out DIR`` writes ``DIR/<engine>.json`` per engine instead, each atomically. Bad input exits
with status 2 before anything is written. Key semantics per engine: ``docs/serving.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from checkpoint_tools.schedule_plan import ScheduleRequest
from indexcache_train.model.families import FAMILIES
from indexcache_train.model.presets import PRESETS
from indexcache_train.schedule import IndexCacheSchedule, ScheduleError
from indexcache_train.tools.presets import load_model_config
from indexcache_train.tools.serve_config import ENGINE_TARGET, ENGINES, notes, serve_overrides


class ServeConfigError(ValueError):
    """Bad ``serve-config`` input; the message names the input and the fix."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``serve-config`` verb."""
    p = subparsers.add_parser(
        "serve-config",
        help="schedule overrides for SGLang / vLLM / transformers, every key explicit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--hf", type=Path, metavar="HF_DIR", help="HF checkpoint directory (or its config.json)"
    )
    src.add_argument("--model", metavar="PRESET", help=f"preset: {', '.join(PRESETS)}")
    sched = p.add_mutually_exclusive_group()
    sched.add_argument(
        "--index-topk-freq", type=int, metavar="N", help="every N-th layer Full (1 = all Full)"
    )
    sched.add_argument(
        "--pattern", metavar="FSS...", help="index_topk_pattern: one F/S per trunk layer"
    )
    p.add_argument(
        "--index-skip-topk-offset",
        type=int,
        metavar="M",
        help="offset of the periodic rule (with freq > 1)",
    )
    p.add_argument("--engine", choices=(*ENGINES, "all"), default="all", help="default: all")
    p.add_argument(
        "--out", type=Path, metavar="DIR", help="write DIR/<engine>.json instead of printing"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Resolve the schedule, print or write the overrides; 2 (reason on stderr) on bad input."""
    engines = ENGINES if args.engine == "all" else (args.engine,)
    try:
        config = _load_config(args)
        schedule = _schedule(args, config)
        overrides = serve_overrides(
            schedule,
            engines,
            index_share_for_mtp_iteration=_optional_bool(config, "index_share_for_mtp_iteration"),
            indexer_rope_interleave=_rope_interleave(config),
        )
        if args.out is not None and args.out.exists() and not args.out.is_dir():
            raise ServeConfigError(f"--out {args.out} exists and is not a directory.")
    except (ServeConfigError, ScheduleError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in [*notes(schedule), *_family_notes(config, schedule, engines)]:
        print(f"note: {note}", file=sys.stderr)
    print(f"schedule: {schedule.describe()}", file=sys.stderr)
    if args.out is None:
        # One engine: a single line, for "$(...)" on the engine's command line.
        print(
            json.dumps(overrides[args.engine])
            if len(engines) == 1
            else json.dumps(overrides, indent=2)
        )
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for engine, override in overrides.items():
        path = args.out / f"{engine}.json"
        _write_atomic(path, json.dumps(override, indent=2) + "\n")
        print(f"wrote {path} ({ENGINE_TARGET[engine]})")
    return 0


def _load_config(args: argparse.Namespace) -> dict[str, Any]:
    if args.model is not None:
        if args.model not in PRESETS:
            raise ServeConfigError(
                f"--model {args.model!r} is not a preset ({', '.join(sorted(PRESETS))}). "
                "Fix: name a preset, or pass --hf HF_DIR for a checkpoint on disk."
            )
        return load_model_config(args.model)[1]
    path = args.hf / "config.json" if args.hf.is_dir() else args.hf
    if not path.is_file():
        raise ServeConfigError(
            f"--hf {args.hf}: {path} does not exist. Fix: give the HF checkpoint directory "
            "(the one holding config.json), or --model PRESET."
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ServeConfigError(f"--hf {args.hf}: {path} is not valid JSON ({err}).") from None
    if not isinstance(config, dict) or "num_hidden_layers" not in config:
        raise ServeConfigError(
            f"--hf {args.hf}: {path} has no num_hidden_layers, so the layer count is unknown. "
            "Fix: point --hf at an HF checkpoint's config.json, or use --model PRESET."
        )
    return config


def _schedule(args: argparse.Namespace, config: dict[str, Any]) -> IndexCacheSchedule:
    """The flags' schedule when given (same rules as convert-schedule), else the config's."""
    n = int(config["num_hidden_layers"])
    num_mtp = int(config.get("num_nextn_predict_layers") or 0)
    share_mtp = bool(config.get("index_share_for_mtp_iteration", False))
    try:
        current = IndexCacheSchedule.from_hf_config(config)
    except ScheduleError as err:
        source = f"--model {args.model}" if args.model is not None else f"--hf {args.hf}"
        raise ServeConfigError(f"{source}: config.json schedule keys: {err}") from None
    if args.index_topk_freq is not None and args.index_topk_freq < 1:
        raise ServeConfigError(
            f"--index-topk-freq {args.index_topk_freq} is invalid: it must be >= 1 "
            "(1 keeps every layer Full, 4 makes every 4th layer Full)."
        )
    if args.index_topk_freq is None and args.pattern is None:
        if args.index_skip_topk_offset is not None:
            raise ServeConfigError(
                "--index-skip-topk-offset needs --index-topk-freq. Fix: add --index-topk-freq N."
            )
        return current
    request = ScheduleRequest(args.index_topk_freq, args.index_skip_topk_offset, args.pattern)
    try:
        schedule = request.build(n, num_mtp, share_mtp)
    except ScheduleError as err:
        flag = "--pattern" if args.pattern is not None else "--index-topk-freq/offset"
        raise ServeConfigError(f"{flag}: {err}") from None
    if args.hf is not None:
        _check_indexers_exist(current, schedule, args.hf)
    return schedule


def _check_indexers_exist(
    current: IndexCacheSchedule, wanted: IndexCacheSchedule, hf: Path
) -> None:
    """A layer Full in ``wanted`` but Shared in the checkpoint has no indexer weights to load."""
    missing = [
        i
        for i, (have, want) in enumerate(zip(current.indexer_types, wanted.indexer_types))
        if have != want and want == "full"
    ]
    if missing:
        raise ServeConfigError(
            f"layer(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} are Full in the "
            f"requested schedule but Shared in {hf}'s config.json, so the checkpoint has no "
            "indexer for them. Fix: pick a schedule whose Full layers are Full in the checkpoint, "
            "or convert it first (python -m checkpoint_tools convert-schedule)."
        )


def _family_notes(
    config: dict[str, Any], schedule: IndexCacheSchedule, engines: tuple[str, ...]
) -> list[str]:
    family = FAMILIES.get(str(config.get("model_type")))
    if "transformers" not in engines or family is None or family.supports_shared_layers:
        return []
    if all(t == "full" for t in schedule.indexer_types):
        return []
    return [
        f"{family.model_type} in transformers 5.17 ignores these keys and builds an indexer on "
        "every layer (indexcache_train.model.families); the transformers patch only helps other readers."
    ]


def _optional_bool(config: dict[str, Any], key: str) -> bool | None:
    value = config.get(key)
    return None if value is None else bool(value)


def _rope_interleave(config: dict[str, Any]) -> bool | None:
    """The config's ``indexer_rope_interleave``, else what transformers implements for its family."""
    value = _optional_bool(config, "indexer_rope_interleave")
    if value is not None:
        return value
    family = FAMILIES.get(str(config.get("model_type")))
    return None if family is None else family.indexer_rope_interleave


def _write_atomic(path: Path, text: str) -> None:
    """Temp file in the same directory, then rename: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
