"""The Megatron checkpoint directory ``import`` writes and ``export`` / the trainer read.

Layout (``torch_dist`` is Megatron's dist-checkpointing format, i.e. torch DCP)::

    MEGATRON_DIR/
      model_config.yaml     the model: HF config dict (schedule keys explicit) + MTP depth
      import_metadata.json  provenance: source, layout, dtype, notes, peak memory per rank
      metadata.json         Megatron dist-checkpointing header ({"sharded_backend": "torch_dist"})
      .metadata             torch DCP index: every sharded key, global shape, dtype, chunks
      __<rank>_<n>.distcp   tensor data, written by each rank for the shards it owns

Tensors are stored under Megatron's sharded keys with *global* shapes (layer numbers global,
routed experts stacked as ``...mlp.experts.experts.<param>`` ``[E, ...]``), so any TP / PP / EP
layout loads them (``dist_checkpointing.load`` reshards). The model is rebuilt with
``ModelConfig.from_hf_config(hf_config, num_mtp_layers=num_mtp_layers)`` (:func:`read_model_config`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from checkpoint_tools.errors import ConfigError
from indexcache_train.model.config import ModelConfig
from indexcache_train.schedule import IndexCacheSchedule
from indexcache_train.schedule.hf_keys import SCHEDULE_KEYS

MODEL_CONFIG_NAME = "model_config.yaml"
IMPORT_METADATA_NAME = "import_metadata.json"
#: The trainer's resolved config, saved in every trainer checkpoint.
RUN_CONFIG_NAME = "run_config.yaml"
#: Files whose presence makes a directory an HF tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
MEGATRON_METADATA_NAME = "metadata.json"
FORMAT = "indexcache-megatron/1"
#: ``--dtype`` choices of import (parameter dtype) and export (tensor dtype).
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: Keys that describe the stored weights, not the model; dropped from the model config.
_STORAGE_KEYS = ("quantization_config", "torch_dtype")
_HEADER = (
    "# IndexCache model of a Megatron torch_dist checkpoint (written by checkpoint_tools import).\n"
    "# Rebuild: ModelConfig.from_hf_config(hf_config, num_mtp_layers=num_mtp_layers)\n"
)


def resolve_model_config(
    hf_config: Mapping[str, Any], schedule: IndexCacheSchedule, file: str = "config.json"
) -> tuple[dict[str, Any], ModelConfig, list[str]]:
    """The config dict to store for ``schedule``, the model it builds, and notes.

    The schedule keys are replaced by ``schedule.to_hf_config()`` and the model is then built
    *from that dict*, so the stored config and the stored tensors can never disagree: MTP roles
    follow what the keys read back as (``IndexCacheSchedule.from_hf_config``); a non-periodic
    pattern's explicit MTP role cannot be expressed and is reported in the notes.
    """
    base = {k: v for k, v in hf_config.items() if k not in SCHEDULE_KEYS + _STORAGE_KEYS}
    base.update(schedule.to_hf_config())
    try:
        model = ModelConfig.from_hf_config(base)
    except ValueError as exc:
        raise ConfigError(
            f"the trainer cannot build this model: {exc}",
            file=file,
            fix="use a GLM-5 / DeepSeek-V3.2 config (dense-MLA parents: run convert-schedule first)",
        ) from exc
    if model.schedule.indexer_types != schedule.indexer_types:
        raise AssertionError(f"trunk schedule changed on read-back: {model.schedule.describe()}")
    notes = []
    if model.schedule.mtp_indexer_types != schedule.mtp_indexer_types:
        notes.append(
            f"MTP roles {list(schedule.mtp_indexer_types)} were requested but the config keys can "
            f"only express {list(model.schedule.mtp_indexer_types)}; MTP layers follow the latter"
        )
    return {**base, **model.to_hf_config()}, model, notes


def truncated_config(
    hf_config: Mapping[str, Any], model: ModelConfig, num_layers: int
) -> dict[str, Any]:
    """The config of the model's first ``num_layers`` trunk layers, without MTP (``verify``)."""
    if not 0 < num_layers <= model.num_layers:
        raise ConfigError(
            f"--num-layers {num_layers} is outside 1..{model.num_layers}", fix="pick fewer layers"
        )
    sched = IndexCacheSchedule.from_indexer_types(
        model.schedule.indexer_types[:num_layers],
        num_layers,
        index_share_for_mtp_iteration=model.schedule.index_share_for_mtp_iteration,
    )
    out = {k: v for k, v in hf_config.items() if k not in SCHEDULE_KEYS}
    out.update(sched.to_hf_config(), num_hidden_layers=num_layers, num_nextn_predict_layers=0)
    for key in ("mlp_layer_types", "layer_types"):
        if out.get(key) is not None:
            out[key] = list(out[key])[:num_layers]
    return out


def model_config_yaml(hf_config: Mapping[str, Any], model: ModelConfig) -> str:
    """Text of ``model_config.yaml``: the config dict, the MTP depth and (for humans) the schedule."""
    doc = {
        "format": FORMAT,
        "num_mtp_layers": model.num_mtp_layers,
        "schedule": model.schedule.describe(),
        "hf_config": dict(hf_config),
    }
    return _HEADER + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)


def write_model_config(directory: Path, hf_config: Mapping[str, Any], model: ModelConfig) -> None:
    (directory / MODEL_CONFIG_NAME).write_text(model_config_yaml(hf_config, model))


def read_model_config(directory: str | Path) -> tuple[dict[str, Any], ModelConfig]:
    """``(hf_config, ModelConfig)`` of a Megatron checkpoint directory written by ``import``."""
    path = Path(directory) / MODEL_CONFIG_NAME
    if not path.is_file():
        raise ConfigError(
            f"no {MODEL_CONFIG_NAME}: not a checkpoint written by `checkpoint_tools import`",
            file=str(path),
            fix="point --ckpt at a directory written by `python -m checkpoint_tools import` (or "
            "one the trainer saved, which carries the same file)",
        )
    try:
        doc = yaml.safe_load(path.read_text())
        hf_config, num_mtp = dict(doc["hf_config"]), int(doc["num_mtp_layers"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"unreadable {MODEL_CONFIG_NAME} ({exc!r})", file=str(path)) from exc
    try:
        model = ModelConfig.from_hf_config(hf_config, num_mtp_layers=num_mtp)
    except ValueError as exc:
        raise ConfigError(f"model config is invalid: {exc}", file=str(path)) from exc
    return hf_config, model


def check_torch_dist(directory: str | Path) -> Path:
    """The directory, after checking it holds a Megatron ``torch_dist`` checkpoint."""
    path = Path(directory)
    header = path / MEGATRON_METADATA_NAME
    try:
        backend = json.loads(header.read_text()).get("sharded_backend")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise ConfigError(
            f"no readable {MEGATRON_METADATA_NAME}: not a Megatron distributed checkpoint ({exc})",
            file=str(header),
            fix="point --ckpt at a Megatron dist-checkpointing directory",
        ) from exc
    if backend != "torch_dist":
        raise ConfigError(
            f"sharded_backend is {backend!r}; only torch_dist checkpoints are supported",
            file=str(header),
            fix="re-save the checkpoint with Megatron's default torch_dist format",
        )
    return path


def write_json(directory: Path, name: str, obj: object) -> None:
    (directory / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def resolve_checkpoint_dir(path: str | Path) -> tuple[Path, str | None]:
    """The checkpoint directory ``path`` names, following a run's ``latest`` pointer.

    ``path`` may be a checkpoint directory (with ``model_config.yaml``), a run's ``checkpoints/``
    directory or the run directory itself. Returns the directory and a note saying which
    checkpoint ``latest`` selected (None when ``path`` was one already).

    Raises:
        ConfigError: a run directory without a complete checkpoint.
    """
    # The trainer owns the run layout and what "latest" means; imported here only (the one
    # import of training code by the checkpoint tools).
    from indexcache_train.training.checkpointing import STEP_PREFIX, latest

    directory = Path(path)
    if (directory / MODEL_CONFIG_NAME).is_file():
        return directory, None
    for root in (directory, directory / "checkpoints"):
        if (root / "latest").is_file() or any(root.glob(f"{STEP_PREFIX}*")):
            found, incomplete = latest(root)
            if found is None:
                raise ConfigError(
                    "no complete checkpoint here (no `latest` pointer to a directory with "
                    "trainer_state.json, and no such step_* directory)",
                    file=str(root),
                    fix="point --ckpt at a complete step_* directory, or resume the run so it saves",
                )
            # A newer checkpoint that is incomplete (crash mid-save) is skipped, and said so.
            note = "; ".join([f"following {root / 'latest'}: {found}", *incomplete])
            return found, note
    return directory, None


def side_file_source(directory: Path) -> tuple[Path | None, str]:
    """An HF directory with the tokenizer of the model a checkpoint holds, and where it came from.

    Looked up in the checkpoint's own provenance: the HF source ``import`` recorded in
    ``import_metadata.json``, else the trainer's ``run_config.yaml`` (``model.hf_path``, then an
    HF tokenizer directory in ``data.tokenizer``). Returns ``(None, reason)`` when none has
    tokenizer files.
    """
    candidates: list[tuple[str, object]] = []
    meta = directory / IMPORT_METADATA_NAME
    if meta.is_file():
        candidates.append((f"{IMPORT_METADATA_NAME} source", _read_json(meta).get("source")))
    run = directory / RUN_CONFIG_NAME
    if run.is_file():
        doc = yaml.safe_load(run.read_text()) or {}
        candidates.append(("run_config model.hf_path", (doc.get("model") or {}).get("hf_path")))
        candidates.append(("run_config data.tokenizer", (doc.get("data") or {}).get("tokenizer")))
    looked = []
    for what, value in candidates:
        if not value:
            continue
        where = Path(str(value))
        where = where.parent if where.name == "config.json" else where
        if where.is_dir() and any((where / f).is_file() for f in TOKENIZER_FILES):
            return where, f"{what} {where}"
        looked.append(f"{what} {where}")
    if not looked:
        return None, "the checkpoint records no HF source (model.hf_path / import source)"
    return None, f"no HF tokenizer files ({', '.join(TOKENIZER_FILES)}) in " + "; ".join(looked)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"unreadable {path.name} ({exc})", file=str(path)) from exc
    return doc if isinstance(doc, dict) else {}
