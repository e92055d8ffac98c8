"""``--model``: a preset name or a ``config.json`` path, resolved to an HF config dict.

A preset gives the keys its family record knows (``ModelFamily.preset_keys``: layer counts,
dense layers, schedule keys; HF key names), without importing transformers or torch, so the
schedule tools stay light; a preset and a real ``config.json`` go through the same code
(:func:`load_model_config`, then ``IndexCacheSchedule.from_hf_config``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from indexcache_train.model.families import preset_owner
from indexcache_train.model.presets import PRESETS


class ModelNotFoundError(ValueError):
    """``--model`` is neither a preset name nor a path to an HF ``config.json``."""


def load_model_config(model: str) -> tuple[str, dict[str, Any]]:
    """An HF config (as a dict) from a preset name, a ``config.json`` or a directory with one.

    Args:
        model: Preset name (see :data:`PRESETS`), or a path.

    Returns:
        ``(label, config)``: a short name for printing and the config keys.

    Raises:
        ModelNotFoundError: Unknown preset and no such config file.
    """
    family = preset_owner(model)
    if family is not None:
        return model, family.preset_keys(model)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(
            f"--model {model!r} is not a preset ({', '.join(sorted(PRESETS))}) and "
            f"{path} is not a file. Fix: name a preset or give an HF config.json (or its folder)."
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelNotFoundError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or "num_hidden_layers" not in config:
        raise ModelNotFoundError(f"{path} has no num_hidden_layers; is it an HF config.json?")
    return str(path), config
