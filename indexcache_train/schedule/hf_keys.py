"""The HF ``config.json`` schedule keys: how transformers, vLLM and SGLang read them, and our writer.

The keys are the upstream names (``indexer_types``, ``index_topk_pattern``, ``index_topk_freq``,
``index_skip_topk_offset``, ``index_share_for_mtp_iteration``). Readers agree on the periodic
rule once the offset is explicit, but not on defaults (``docs/serving.md`` has the sources):

* transformers >= 5.11, vLLM and upstream SGLang assume offset 2 when it is absent; the
  THUDM/IndexCache SGLang patch has no offset key and hard-wires the same rule;
* Megatron-Core's ``dsa_indexer_skip_topk_offset`` defaults to 0 and is clamped to >= 1;
* vLLM and SGLang read ``index_topk_pattern`` before freq/offset and ignore ``indexer_types``.

So :func:`write_hf_config` writes every key explicitly, :func:`read_hf_config` applies the HF
precedence and default, and our own YAML (:func:`read_yaml_keys`) refuses to guess an offset.
Pure Python, like the core (:mod:`indexcache_train.schedule.core`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from indexcache_train.schedule.core import IndexCacheSchedule, ScheduleError, check_int

#: The schedule keys every written config carries (:func:`write_hf_config`'s keys).
SCHEDULE_KEYS = ("indexer_types", "index_topk_freq", "index_skip_topk_offset", "index_topk_pattern")
#: Offset HF (>= 5.11), vLLM and SGLang assume when ``index_skip_topk_offset`` is absent.
HF_DEFAULT_OFFSET = 2
#: Which schedule keys each engine is known to read (transformers 5.17 ``GlmMoeDsaConfig``, checked
#: by tests/unit/test_serve_config.py; vLLM and SGLang from public engine code, docs/serving.md).
ENGINE_READS: dict[str, tuple[str, ...]] = {
    "transformers": SCHEDULE_KEYS,
    "vllm": ("index_topk_pattern", "index_topk_freq", "index_skip_topk_offset"),
    "sglang": ("index_topk_pattern", "index_topk_freq", "index_skip_topk_offset"),
}
#: Offset each engine assumes when ``index_skip_topk_offset`` is absent.
ENGINE_DEFAULT_OFFSET = {"transformers": HF_DEFAULT_OFFSET, "vllm": 2, "sglang": 2}


def read_hf_config(
    config: Mapping[str, object], num_mtp_layers: int | None = None
) -> IndexCacheSchedule:
    """Read HF / vLLM / SGLang keys. A missing ``index_skip_topk_offset`` means 2 here.

    Precedence: ``indexer_types`` > ``index_topk_pattern`` > freq/offset. A lower-precedence
    key is an error only when it was given explicitly and disagrees. ``index_topk_freq: 1`` is
    the engines' "disabled" default and never conflicts with a pattern or list (our own
    export writes it beside a non-periodic pattern on purpose).
    """
    if "num_hidden_layers" not in config:
        raise ScheduleError("config has no num_hidden_layers; cannot size the schedule.")
    n = int(config["num_hidden_layers"])  # type: ignore[arg-type]
    if num_mtp_layers is None:
        num_mtp_layers = int(config.get("num_nextn_predict_layers") or 0)  # type: ignore[arg-type]
    share_mtp = bool(config.get("index_share_for_mtp_iteration", False))
    return _resolve(config, n, num_mtp_layers, HF_DEFAULT_OFFSET, share_mtp, source="HF config")


def read_yaml_keys(
    num_layers: int,
    num_mtp_layers: int = 0,
    *,
    index_topk_freq: int | None = None,
    index_skip_topk_offset: int | None = None,
    index_topk_pattern: str | None = None,
    indexer_types: Sequence[str] | None = None,
    index_share_for_mtp_iteration: bool = False,
) -> IndexCacheSchedule:
    """Our own YAML: same precedence as HF, but a freq > 1 must come with an explicit offset."""
    keys: dict[str, object] = {"num_hidden_layers": num_layers}
    for k, v in (
        ("index_topk_freq", index_topk_freq),
        ("index_skip_topk_offset", index_skip_topk_offset),
        ("index_topk_pattern", index_topk_pattern),
        ("indexer_types", indexer_types),
    ):
        if v is not None:
            keys[k] = v
    return _resolve(
        keys, num_layers, num_mtp_layers, None, index_share_for_mtp_iteration, source="config"
    )


def write_hf_config(schedule: IndexCacheSchedule) -> dict[str, object]:
    """Schedule keys for an exported ``config.json`` (every key explicit, no defaults relied on).

    Periodic: ``indexer_types`` + freq/offset, ``index_topk_pattern: null``. Otherwise the
    pattern with ``index_topk_freq: 1``, so an engine that ignores the pattern builds every
    layer Full and then fails loudly on the missing Shared-layer indexers instead of
    silently running a wrong schedule.
    """
    out: dict[str, object] = {"indexer_types": list(schedule.indexer_types)}
    if schedule.is_periodic:
        out["index_topk_freq"] = schedule.index_topk_freq
        out["index_skip_topk_offset"] = schedule.index_skip_topk_offset
        out["index_topk_pattern"] = None
    else:
        out["index_topk_freq"] = 1
        out["index_skip_topk_offset"] = 1
        out["index_topk_pattern"] = schedule.pattern
    out["index_share_for_mtp_iteration"] = schedule.index_share_for_mtp_iteration
    return out


def _resolve(
    keys: Mapping[str, object],
    n: int,
    num_mtp: int,
    default_offset: int | None,
    share_mtp: bool,
    source: str,
) -> IndexCacheSchedule:
    types = keys.get("indexer_types")
    pattern = keys.get("index_topk_pattern")
    freq = keys.get("index_topk_freq")
    offset = keys.get("index_skip_topk_offset")
    periodic: IndexCacheSchedule | None = None
    if freq is not None:
        check_int("index_topk_freq", freq, minimum=1)
        # freq 1 is every engine's "disabled" default: all Full, and never in conflict with a
        # pattern or list (our own export writes it beside a non-periodic pattern on purpose).
        if freq > 1:  # type: ignore[operator]
            if offset is None:
                if default_offset is None:
                    raise ScheduleError(
                        f"{source}: index_topk_freq={freq} needs an explicit "
                        "index_skip_topk_offset (HF, vLLM and SGLang assume 2, Megatron 1). "
                        "Fix: set it, e.g. 3 for GLM-5.2."
                    )
                offset = default_offset
            periodic = IndexCacheSchedule.from_freq_offset(
                n,
                freq,
                offset,
                num_mtp,
                index_share_for_mtp_iteration=share_mtp,  # type: ignore[arg-type]
            )
    from_pattern = (
        IndexCacheSchedule.from_pattern(
            pattern, n, num_mtp, index_share_for_mtp_iteration=share_mtp
        )
        if pattern is not None
        else None
    )
    if types is not None:
        chosen = IndexCacheSchedule.from_indexer_types(
            types,
            n,
            num_mtp,
            index_share_for_mtp_iteration=share_mtp,  # type: ignore[arg-type]
        )
        _agree(chosen, from_pattern, "indexer_types", "index_topk_pattern", source)
        _agree(chosen, periodic, "indexer_types", "index_topk_freq/index_skip_topk_offset", source)
        return _mtp_from_rule(chosen, periodic, len(types) == n)  # type: ignore[arg-type]
    if from_pattern is not None:
        _agree(
            from_pattern,
            periodic,
            "index_topk_pattern",
            "index_topk_freq/index_skip_topk_offset",
            source,
        )
        return _mtp_from_rule(from_pattern, periodic, len(pattern) == n)  # type: ignore[arg-type]
    if periodic is not None:
        return periodic
    return IndexCacheSchedule.all_full(n, num_mtp, index_share_for_mtp_iteration=share_mtp)


def _mtp_from_rule(
    chosen: IndexCacheSchedule, periodic: IndexCacheSchedule | None, trunk_only: bool
) -> IndexCacheSchedule:
    """A trunk-length list/pattern says nothing about MTP layers; when freq/offset were given
    too (and agree on the trunk), MTP layer k follows their rule at global index N+k."""
    return periodic if periodic is not None and trunk_only else chosen


def _agree(
    chosen: IndexCacheSchedule,
    other: IndexCacheSchedule | None,
    winner: str,
    loser: str,
    source: str,
) -> None:
    if other is None or other.indexer_types == chosen.indexer_types:
        return
    diff = [i for i, (a, b) in enumerate(zip(chosen.indexer_types, other.indexer_types)) if a != b]
    raise ScheduleError(
        f"{source}: {winner} ({chosen.pattern}) disagrees with {loser} ({other.pattern}) at "
        f"layer(s) {diff[:8]}. Fix: remove {loser} or make it match {winner}."
    )
