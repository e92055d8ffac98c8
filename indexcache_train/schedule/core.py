"""The schedule core: per-layer roles (Full / Shared), each Shared layer's source, share groups.

Pure Python; imports neither torch nor Megatron (a layering test enforces this), so the pipeline
guard, the checkpoint tools and the config validation can all use it before anything is built.
Ecosystem conventions (key names, precedence, default offsets) live in adapters:
:mod:`indexcache_train.schedule.hf_keys` for HF / vLLM / SGLang config keys.

Vocabulary (facts section 1-2, paper arXiv 2603.12201):
  * Full (``"full"``, ``F``): the layer runs its own lightning indexer and computes top-k.
  * Shared (``"shared"``, ``S``): the layer has no indexer and reuses the top-k of its *source*,
    the nearest preceding Full layer.
  * Share group: one Full layer plus the Shared layers that read its top-k.

Global layer indices are 0-based: trunk layers are ``0 .. num_layers-1`` and MTP layer ``k``
(0-based) sits at global index ``num_layers + k``, as in the HF checkpoint (``model.layers.{N+k}``).

Rule (HF >= 5.11, vLLM, SGLang and Megatron-Core 0.19 all agree once the offset is explicit)::

    full(i)  <=>  max(i - offset + 1, 0) % freq == 0

Constructors here take roles or an explicit freq / offset; they never assume a default offset.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

FULL = "full"
SHARED = "shared"
_CHAR_TO_TYPE = {"F": FULL, "S": SHARED}
_TYPE_TO_CHAR = {FULL: "F", SHARED: "S"}


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
        check_int("index_topk_freq", freq, minimum=1)
        check_int("index_skip_topk_offset", offset, minimum=0)
        check_int("num_hidden_layers", num_layers, minimum=1)
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

    # ------------------------------------------------------------------ HF config keys
    @classmethod
    def from_hf_config(
        cls, config: Mapping[str, object], num_mtp_layers: int | None = None
    ) -> IndexCacheSchedule:
        """Read HF / vLLM / SGLang ``config.json`` keys (:func:`.hf_keys.read_hf_config`)."""
        from indexcache_train.schedule import hf_keys  # the adapter builds on this module

        return hf_keys.read_hf_config(config, num_mtp_layers)

    @classmethod
    def from_keys(cls, num_layers: int, num_mtp_layers: int = 0, **keys: Any) -> IndexCacheSchedule:
        """Our YAML's schedule keys (:func:`.hf_keys.read_yaml_keys`: no default offset)."""
        from indexcache_train.schedule import hf_keys

        return hf_keys.read_yaml_keys(num_layers, num_mtp_layers, **keys)

    def to_hf_config(self) -> dict[str, object]:
        """Schedule keys for an exported ``config.json`` (:func:`.hf_keys.write_hf_config`)."""
        from indexcache_train.schedule import hf_keys

        return hf_keys.write_hf_config(self)

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
def check_int(key: str, value: object, minimum: int) -> None:
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
