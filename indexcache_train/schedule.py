"""The IndexCache schedule: which layers are Full (own indexer) and which are Shared.

Pure Python; imports neither torch nor Megatron (a layering test enforces this), so the pipeline
guard, the checkpoint tools and the config validation can all use it before anything is built.

Vocabulary (facts section 1-2, paper arXiv 2603.12201):
  * Full (``"full"``, ``F``): the layer runs its own lightning indexer and computes top-k.
  * Shared (``"shared"``, ``S``): the layer has no indexer and reuses the top-k of its *source*,
    the nearest preceding Full layer.
  * Share group: one Full layer plus the Shared layers that read its top-k.

Global layer indices are 0-based: trunk layers are ``0 .. num_layers-1`` and MTP layer ``k``
(0-based) sits at global index ``num_layers + k``, as in the HF checkpoint (``model.layers.{N+k}``).

Rule (HF >= 5.11, vLLM, SGLang and Megatron-Core 0.19 all agree once the offset is explicit)::

    full(i)  <=>  max(i - offset + 1, 0) % freq == 0

Offset defaults differ between ecosystems (HF/vLLM/SGLang: 2; Megatron clamps to >= 1), so this
module never guesses: callers say which convention a config came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

FULL = "full"
SHARED = "shared"
_CHAR_TO_TYPE = {"F": FULL, "S": SHARED}
_TYPE_TO_CHAR = {FULL: "F", SHARED: "S"}

#: Offset HF (>= 5.11), vLLM and SGLang assume when ``index_skip_topk_offset`` is absent.
HF_DEFAULT_OFFSET = 2
#: Megatron-Core's ``dsa_indexer_skip_topk_offset`` default (clamped to 1 by ``is_dsa_skip_topk_layer``).
MEGATRON_DEFAULT_OFFSET = 0


class ScheduleError(ValueError):
    """Invalid IndexCache schedule input; the message names the key and the fix."""


def rule_is_full(index: int, freq: int, offset: int) -> bool:
    """The periodic rule for 0-based global layer ``index``."""
    return max(index - offset + 1, 0) % freq == 0


@dataclass(frozen=True)
class ShareGroup:
    """One Full layer and the Shared layers (trunk or MTP) that reuse its top-k."""

    source: int
    shared: tuple[int, ...]

    @property
    def members(self) -> tuple[int, ...]:
        """Source first, then its consumers in execution order."""
        return (self.source, *self.shared)

    @property
    def size(self) -> int:
        return 1 + len(self.shared)


@dataclass(frozen=True)
class IndexCacheSchedule:
    """Per-layer roles for a model with ``num_layers`` trunk layers and ``num_mtp_layers`` MTP layers.

    Build it with one of the ``from_*`` constructors; they validate. ``indexer_types`` covers the
    trunk and ``mtp_indexer_types`` the MTP layers.
    """

    indexer_types: tuple[str, ...]
    mtp_indexer_types: tuple[str, ...] = ()
    #: Set when the trunk (and MTP) roles follow the periodic rule; ``None`` for free patterns.
    index_topk_freq: int | None = None
    index_skip_topk_offset: int | None = None
    #: Carried through from the source config and written back on export; never interpreted.
    index_share_for_mtp_iteration: bool = False
    _sources: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        types = (*self.indexer_types, *self.mtp_indexer_types)
        for key, values in (("indexer_types", self.indexer_types), ("mtp", self.mtp_indexer_types)):
            bad = [t for t in values if t not in (FULL, SHARED)]
            if bad:
                raise ScheduleError(
                    f"{key} holds {bad[0]!r}; every entry must be 'full' or 'shared'."
                )
        if not self.indexer_types:
            raise ScheduleError("indexer_types is empty; a model needs at least one layer.")
        if self.indexer_types[0] != FULL:
            raise ScheduleError(
                "layer 0 is Shared, but a Shared layer needs an earlier Full layer to reuse top-k "
                "from. Fix: make layer 0 Full (pattern starting with 'F', or "
                "index_skip_topk_offset >= 1)."
            )
        sources: list[int] = []
        last_full_trunk = 0
        for i, kind in enumerate(types):
            if kind == FULL:
                sources.append(i)
                if i < len(self.indexer_types):
                    last_full_trunk = i
            elif i < len(self.indexer_types):
                sources.append(sources[i - 1] if types[i - 1] == SHARED else i - 1)
            else:
                # A Shared MTP layer reuses the trunk: its inputs are a different token stream
                # than an earlier MTP depth's, so only trunk top-k is a valid source.
                sources.append(last_full_trunk)
        object.__setattr__(self, "_sources", tuple(sources))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_freq_offset(
        cls,
        num_layers: int,
        freq: int,
        offset: int,
        num_mtp_layers: int = 0,
        *,
        index_share_for_mtp_iteration: bool = False,
    ) -> IndexCacheSchedule:
        """Periodic schedule; MTP layer ``k`` follows the rule at global index ``num_layers + k``."""
        _check_int("index_topk_freq", freq, minimum=1)
        _check_int("index_skip_topk_offset", offset, minimum=0)
        _check_int("num_hidden_layers", num_layers, minimum=1)
        types = [FULL if rule_is_full(i, freq, offset) else SHARED for i in range(num_layers)]
        mtp = [
            FULL if rule_is_full(num_layers + k, freq, offset) else SHARED
            for k in range(num_mtp_layers)
        ]
        if types[0] != FULL:
            raise ScheduleError(
                f"index_skip_topk_offset={offset} with index_topk_freq={freq} makes layer 0 "
                "Shared. Fix: use index_skip_topk_offset >= 1 (Megatron clamps 0 to 1; HF, vLLM "
                "and SGLang default to 2)."
            )
        return cls(
            tuple(types),
            tuple(mtp),
            index_topk_freq=freq,
            index_skip_topk_offset=offset,
            index_share_for_mtp_iteration=index_share_for_mtp_iteration,
        )

    @classmethod
    def from_pattern(
        cls,
        pattern: str,
        num_layers: int | None = None,
        num_mtp_layers: int = 0,
        *,
        index_share_for_mtp_iteration: bool = False,
    ) -> IndexCacheSchedule:
        """An ``F``/``S`` string, one character per trunk layer.

        It may also carry one character per MTP layer (length ``num_layers + num_mtp_layers``);
        otherwise MTP layers are Full, as every released DSA checkpoint's MTP layer is.
        """
        if not isinstance(pattern, str):
            raise ScheduleError(f"index_topk_pattern must be a string of F/S, got {pattern!r}.")
        bad = sorted({c for c in pattern if c not in _CHAR_TO_TYPE})
        if bad:
            raise ScheduleError(
                f"index_topk_pattern has unknown character(s) {bad}; use only 'F' (Full) and "
                "'S' (Shared), one per layer."
            )
        types = [_CHAR_TO_TYPE[c] for c in pattern]
        return cls.from_indexer_types(
            types,
            num_layers=num_layers,
            num_mtp_layers=num_mtp_layers,
            key="index_topk_pattern",
            index_share_for_mtp_iteration=index_share_for_mtp_iteration,
        )

    @classmethod
    def from_indexer_types(
        cls,
        types: Sequence[str],
        num_layers: int | None = None,
        num_mtp_layers: int = 0,
        *,
        key: str = "indexer_types",
        index_share_for_mtp_iteration: bool = False,
    ) -> IndexCacheSchedule:
        """Explicit per-layer list of ``"full"``/``"shared"`` (HF's ``indexer_types``)."""
        if isinstance(types, str) or not isinstance(types, Iterable):
            raise ScheduleError(f"{key} must be a list of 'full'/'shared', got {types!r}.")
        types = list(types)
        n = len(types) if num_layers is None else num_layers
        if len(types) not in (n, n + num_mtp_layers):
            raise ScheduleError(
                f"{key} has {len(types)} entries but the model has {n} layers"
                + (f" (+{num_mtp_layers} MTP)" if num_mtp_layers else "")
                + f". Fix: give exactly {n} entries"
                + (f" (or {n + num_mtp_layers} including MTP)." if num_mtp_layers else ".")
            )
        if types and types[0] != FULL:
            raise ScheduleError(
                f"{key} starts with a Shared layer; a Shared layer needs an earlier Full layer. "
                "Fix: make layer 0 Full."
            )
        trunk, mtp = types[:n], types[n:] or [FULL] * num_mtp_layers
        periodic = _find_period(trunk, mtp, n)
        freq, offset = periodic if periodic else (None, None)
        return cls(
            tuple(trunk),
            tuple(mtp),
            index_topk_freq=freq,
            index_skip_topk_offset=offset,
            index_share_for_mtp_iteration=index_share_for_mtp_iteration,
        )

    @classmethod
    def all_full(
        cls,
        num_layers: int,
        num_mtp_layers: int = 0,
        *,
        index_share_for_mtp_iteration: bool = False,
    ) -> IndexCacheSchedule:
        """Plain DSA: every layer (MTP included) runs its own indexer."""
        return cls.from_freq_offset(
            num_layers,
            1,
            1,
            num_mtp_layers,
            index_share_for_mtp_iteration=index_share_for_mtp_iteration,
        )

    @classmethod
    def from_hf_config(
        cls, config: Mapping[str, object], num_mtp_layers: int | None = None
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

    @classmethod
    def from_megatron(
        cls,
        num_layers: int,
        dsa_indexer_topk_freq: int | None,
        dsa_indexer_skip_topk_offset: int | None,
        num_mtp_layers: int = 0,
    ) -> IndexCacheSchedule:
        """Megatron-Core's ``dsa_indexer_topk_freq`` / ``dsa_indexer_skip_topk_offset``.

        Megatron clamps the offset to at least 1 (``is_dsa_skip_topk_layer``); we do the same.
        """
        freq = 1 if dsa_indexer_topk_freq is None else dsa_indexer_topk_freq
        offset = (
            MEGATRON_DEFAULT_OFFSET
            if dsa_indexer_skip_topk_offset is None
            else dsa_indexer_skip_topk_offset
        )
        _check_int("dsa_indexer_skip_topk_offset", offset, minimum=0)
        return cls.from_freq_offset(num_layers, freq, max(offset, 1), num_mtp_layers)

    @classmethod
    def from_keys(
        cls,
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

    # ------------------------------------------------------------------ queries
    @property
    def num_layers(self) -> int:
        return len(self.indexer_types)

    @property
    def num_mtp_layers(self) -> int:
        return len(self.mtp_indexer_types)

    @property
    def all_types(self) -> tuple[str, ...]:
        """Trunk then MTP roles, indexed by global layer index."""
        return (*self.indexer_types, *self.mtp_indexer_types)

    def is_full(self, index: int) -> bool:
        return self.all_types[self._check_index(index)] == FULL

    def source(self, index: int) -> int:
        """Global index of the Full layer whose top-k ``index`` uses (itself when Full)."""
        return self._sources[self._check_index(index)]

    @property
    def full_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.all_types) if t == FULL)

    @property
    def trunk_full_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.indexer_types) if t == FULL)

    def consumers(self, source: int) -> tuple[int, ...]:
        """Shared layers (trunk and MTP) that reuse ``source``'s top-k, in execution order."""
        return tuple(i for i, s in enumerate(self._sources) if s == source and i != source)

    @property
    def groups(self) -> tuple[ShareGroup, ...]:
        return tuple(ShareGroup(f, self.consumers(f)) for f in self.full_layers)

    def is_mtp(self, index: int) -> bool:
        return self._check_index(index) >= self.num_layers

    @property
    def pattern(self) -> str:
        """Trunk roles as an ``F``/``S`` string (HF/SGLang ``index_topk_pattern``)."""
        return "".join(_TYPE_TO_CHAR[t] for t in self.indexer_types)

    @property
    def is_periodic(self) -> bool:
        return self.index_topk_freq is not None

    def to_hf_config(self) -> dict[str, object]:
        """Schedule keys for an exported ``config.json`` (every key explicit, no defaults relied on).

        Periodic: ``indexer_types`` + freq/offset, ``index_topk_pattern: null``. Otherwise the
        pattern with ``index_topk_freq: 1``, so an engine that ignores the pattern builds every
        layer Full and then fails loudly on the missing Shared-layer indexers instead of
        silently running a wrong schedule.
        """
        out: dict[str, object] = {"indexer_types": list(self.indexer_types)}
        if self.is_periodic:
            out["index_topk_freq"] = self.index_topk_freq
            out["index_skip_topk_offset"] = self.index_skip_topk_offset
            out["index_topk_pattern"] = None
        else:
            out["index_topk_freq"] = 1
            out["index_skip_topk_offset"] = 1
            out["index_topk_pattern"] = self.pattern
        out["index_share_for_mtp_iteration"] = self.index_share_for_mtp_iteration
        return out

    def describe(self) -> str:
        n_full = len(self.trunk_full_layers)
        kind = (
            f"freq {self.index_topk_freq} / offset {self.index_skip_topk_offset}"
            if self.is_periodic
            else "custom pattern"
        )
        mtp = "".join(_TYPE_TO_CHAR[t] for t in self.mtp_indexer_types)
        return f"{kind}: {n_full}/{self.num_layers} trunk layers Full, pattern {self.pattern}" + (
            f" + MTP {mtp}" if mtp else ""
        )

    def _check_index(self, index: int) -> int:
        if not 0 <= index < len(self._sources):
            raise IndexError(
                f"layer index {index} outside 0..{len(self._sources) - 1} "
                f"({self.num_layers} trunk + {self.num_mtp_layers} MTP layers)"
            )
        return index


# ---------------------------------------------------------------------- helpers
def _check_int(key: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScheduleError(f"{key} must be an integer, got {value!r}.")
    if value < minimum:
        fix = "1 keeps every layer Full" if key == "index_topk_freq" else f"use >= {minimum}"
        raise ScheduleError(f"{key}={value} is invalid; {fix}.")


def _find_period(trunk: Sequence[str], mtp: Sequence[str], n: int) -> tuple[int, int] | None:
    """The (freq, offset) that reproduces trunk and MTP roles, if any (smallest offset wins)."""
    if all(t == FULL for t in trunk) and all(t == FULL for t in mtp):
        return 1, 1
    lead = next((i for i, t in enumerate(trunk) if t == SHARED), n)
    # The rule makes layers 0..offset-1 Full and then every freq-th layer; the first Shared layer
    # pins offset = lead, and the next Full layer after it pins freq.
    offset = lead
    nxt = next((i for i in range(lead, n) if trunk[i] == FULL), None)
    freqs = [nxt - offset + 1] if nxt is not None else list(range(n - offset + 1, n + 2))
    for freq in freqs:
        if freq < 2:
            continue
        ok = all((trunk[i] == FULL) == rule_is_full(i, freq, offset) for i in range(n)) and all(
            (t == FULL) == rule_is_full(n + k, freq, offset) for k, t in enumerate(mtp)
        )
        if ok:
            return freq, offset
    return None


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
        _check_int("index_topk_freq", freq, minimum=1)
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
