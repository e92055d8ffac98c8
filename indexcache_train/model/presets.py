"""Named model configs (HF ``config.json`` dicts) for experiments, tools and benchmarks.

Real models come from their checkpoint's ``config.json`` (``model.hf_path``); presets are for
sizing (dry runs, pipeline layouts) and for the toy / bench models that have no checkpoint. Each
preset belongs to a family record (:mod:`indexcache_train.model.families`): ``glm5`` / ``glm5.2``
/ ``deepseek-v3.2`` are transformers 5.17's config-class defaults (the released shapes) plus one
MTP layer, DeepSeek-V3.2 with its released YaRN RoPE.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from indexcache_train.model.families import preset_names, preset_owner


class _PresetView(Mapping[str, Callable[[], dict[str, Any]]]):
    """Preset name -> config factory, read live from the registry (families may be added)."""

    def __getitem__(self, name: str) -> Callable[[], dict[str, Any]]:
        if preset_owner(name) is None:
            raise KeyError(name)
        return lambda: preset_hf_config(name)

    def __iter__(self) -> Iterator[str]:
        return iter(preset_names())

    def __len__(self) -> int:
        return len(preset_names())


def preset_hf_config(name: str) -> dict[str, Any]:
    """The HF config dict of preset ``name``.

    Raises:
        KeyError: unknown preset (the message lists the known ones).
    """
    family = preset_owner(name)
    if family is None:
        raise KeyError(
            f"unknown model preset {name!r}; choose one of {sorted(preset_names())} or set "
            "model.hf_path"
        )
    return family.preset_hf_config(name)


def is_toy_preset(name: str) -> bool:
    """Whether ``name`` is a toy preset (the family's toy sizes)."""
    family = preset_owner(name)
    return family is not None and family.presets[name].toy


PRESETS: Mapping[str, Callable[[], dict[str, Any]]] = _PresetView()
