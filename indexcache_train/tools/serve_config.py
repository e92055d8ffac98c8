"""Serving overrides for an IndexCache schedule: SGLang, vLLM and transformers, every key explicit.

Pure Python (no torch, no engine imports): :func:`serve_overrides` turns an
:class:`~indexcache_train.schedule.IndexCacheSchedule` into one dict per engine,

* ``sglang``: the JSON for ``python -m sglang.launch_server --json-model-override-args``;
* ``vllm``: the JSON for ``vllm serve --hf-overrides``;
* ``transformers``: a patch to merge into the checkpoint's ``config.json``.

The transformers patch carries the schedule keys exactly as the checkpoint export writes them
(``IndexCacheSchedule.to_hf_config()``, used by ``checkpoint_tools``). The SGLang and vLLM dicts
carry the same four keys, except that ``index_topk_pattern`` is always the explicit F/S string,
also for a periodic schedule (``docs/serving.md`` has the sources):

* The pattern wins over freq/offset in every reader we know of, and it is the one key they all
  interpret alike. The offset is not: HF / vLLM / upstream SGLang assume 2 when it is absent,
  the THUDM/IndexCache SGLang patch ignores it (hard-wired 2), Megatron clamps to >= 1. GLM-5.2's
  offset 3 would be served wrong by a reader that drops it.
* freq/offset are still written, the offset always, so a reader that ignores the pattern
  computes the same schedule and never falls back on its own default offset.
* ``indexer_types`` is written too: SGLang and vLLM apply their overrides to a config object
  transformers has already built, whose ``indexer_types`` was derived from the checkpoint's own
  keys and would otherwise go stale.

Each engine's dict is read back through ``IndexCacheSchedule.from_hf_config`` (the HF precedence
and defaults) and compared with the schedule, MTP layers included, before anything is printed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from indexcache_train.schedule import SHARED, IndexCacheSchedule, ScheduleError
from indexcache_train.schedule.hf_keys import SCHEDULE_KEYS

ENGINES = ("sglang", "vllm", "transformers")

#: The command-line flag (or file) each engine's dict is for.
ENGINE_TARGET = {
    "sglang": "--json-model-override-args",
    "vllm": "--hf-overrides",
    "transformers": "config.json patch",
}

#: Engines whose override always carries the explicit F/S ``index_topk_pattern``.
EXPLICIT_PATTERN_ENGINES = ("sglang", "vllm")


def serve_overrides(
    schedule: IndexCacheSchedule,
    engines: tuple[str, ...] = ENGINES,
    *,
    index_share_for_mtp_iteration: bool | None = None,
    indexer_rope_interleave: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """One override dict per engine in ``engines``, each read back and checked.

    Args:
        schedule: The schedule to serve.
        engines: Subset of :data:`ENGINES`.
        index_share_for_mtp_iteration: Written when not None. None (unknown, e.g. a preset)
            leaves the checkpoint's own value alone instead of overriding it with a guess.
        indexer_rope_interleave: Written when not None (vLLM assumes False when the key is
            absent, which is wrong for GLM-5).

    Raises:
        ScheduleError: An unknown engine, or a schedule config.json keys cannot express (an MTP
            layer made Shared by an explicit pattern character).
    """
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ScheduleError(f"unknown engine {unknown[0]!r}; use one of {', '.join(ENGINES)}.")
    keys = {k: v for k, v in schedule.to_hf_config().items() if k in SCHEDULE_KEYS}
    if index_share_for_mtp_iteration is not None:
        keys["index_share_for_mtp_iteration"] = index_share_for_mtp_iteration
    if indexer_rope_interleave is not None:
        keys["indexer_rope_interleave"] = indexer_rope_interleave
    out = {engine: dict(keys) for engine in engines}
    for engine in engines:
        if engine in EXPLICIT_PATTERN_ENGINES:
            out[engine]["index_topk_pattern"] = schedule.pattern
    for engine, override in out.items():
        check_round_trip(schedule, override, engine)
    return out


def check_round_trip(
    schedule: IndexCacheSchedule, override: Mapping[str, Any], engine: str = "config"
) -> None:
    """Raise ScheduleError unless ``override`` reads back (HF rules) as ``schedule``, MTP included."""
    config = {
        "num_hidden_layers": schedule.num_layers,
        "num_nextn_predict_layers": schedule.num_mtp_layers,
        **override,
    }
    back = IndexCacheSchedule.from_hf_config(config)
    if back.all_types == schedule.all_types:
        return
    if back.indexer_types != schedule.indexer_types:  # a bug in to_hf_config, not user input
        raise AssertionError(
            f"{engine}: trunk schedule does not survive its override: wrote {schedule.pattern}, "
            f"read back {back.pattern}"
        )
    raise ScheduleError(
        f"MTP roles {list(schedule.mtp_indexer_types)} cannot be expressed in config keys "
        f"(indexer_types / index_topk_pattern cover the trunk only; engines would serve "
        f"{list(back.mtp_indexer_types)}). Fix: give a trunk-length pattern "
        f"({schedule.num_layers} characters); MTP layers are then Full."
    )


def notes(schedule: IndexCacheSchedule) -> list[str]:
    """Caveats to print beside the overrides (engines that may not agree with the schedule)."""
    out = []
    shared_mtp = [schedule.num_layers + k for k, t in enumerate(schedule.mtp_indexer_types)]
    shared_mtp = [i for i in shared_mtp if schedule.all_types[i] == SHARED]
    if shared_mtp:
        out.append(
            f"MTP layer(s) {shared_mtp} are Shared by the freq/offset rule; engines differ here "
            "(the vLLM code we read builds an indexer on every MTP layer): check the engine's log."
        )
    if not schedule.is_periodic:
        out.append(
            "custom pattern: written as index_topk_pattern + indexer_types with "
            "index_topk_freq 1, so an engine that reads neither builds every layer Full and fails "
            "on the missing Shared-layer indexers instead of serving a wrong schedule."
        )
    return out
