"""Built-in model presets: the HF ``config.json`` keys the tools need, for models not on disk.

Each preset is a subset of the model's HF config (same key names), so a preset and a real
``config.json`` go through the same code (:func:`load_model_config`, then
``IndexCacheSchedule.from_hf_config``). Schedule keys are always explicit, never defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # GLM-5: plain DSA, every layer (and the MTP layer) has its own indexer.
    "glm5": {
        "model_type": "glm_moe_dsa",
        "num_hidden_layers": 78,
        "first_k_dense_replace": 3,
        "num_nextn_predict_layers": 1,
        "index_topk_freq": 1,
        "index_skip_topk_offset": 1,
    },
    # GLM-5.2: IndexCache freq 4 / offset 3 -> Full {0, 1, 2, 6, 10, ..., 74}, MTP layer 78 Full.
    "glm5.2": {
        "model_type": "glm_moe_dsa",
        "num_hidden_layers": 78,
        "first_k_dense_replace": 3,
        "num_nextn_predict_layers": 1,
        "index_topk_freq": 4,
        "index_skip_topk_offset": 3,
    },
    # DeepSeek-V3.2: plain DSA, 61 layers, first 3 dense.
    "deepseek-v3.2": {
        "model_type": "deepseek_v32",
        "num_hidden_layers": 61,
        "first_k_dense_replace": 3,
        "num_nextn_predict_layers": 1,
        "index_topk_freq": 1,
        "index_skip_topk_offset": 1,
    },
}


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
    if model in PRESETS:
        return model, dict(PRESETS[model])
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
