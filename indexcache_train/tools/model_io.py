"""Shared plumbing of the analysis verbs: atomic output files, devices, single-process models.

* :func:`write_atomic`: temporary file next to the target, then rename (no half-written output).
* :func:`resolve_device`: ``auto`` / ``cpu`` / ``cuda`` -> ``torch.device``.
* :func:`init_single_process`, :func:`trunk_config` + :func:`read_hf_weights` / :func:`random_weights` + :func:`build_loaded`:
  a model of one schedule (TP = PP = 1, no MTP layers) with weights from an HF checkpoint or a
  seeded random init. A Shared layer maps no indexer tensor (``hf_mapping``), so one all-Full
  weight set serves every schedule.

Heavy imports (torch, Megatron) stay inside the functions: ``--help`` must stay fast.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would survive the rename
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_device(name: str) -> Any:
    """``auto`` -> CUDA when available, else CPU; ``cpu`` / ``cuda`` as given."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_single_process(seed: int = 0) -> None:
    """World size 1, TP = PP = EP = 1 (gloo; idempotent): what a model build needs."""
    from checkpoint_tools.megatron_runtime import ParallelLayout, init_parallel

    init_parallel(ParallelLayout(), seed=seed)


def trunk_config(hf_config: dict[str, Any], pattern: str | None = None) -> Any:
    """``ModelConfig`` of the trunk (no MTP layers: they do not change the main LM loss), with
    the config's own schedule or the F/S ``pattern``. Raises ``ValueError`` (schedule or model
    not supported)."""
    from indexcache_train.model.config import ModelConfig
    from indexcache_train.schedule import IndexCacheSchedule

    n = int(hf_config["num_hidden_layers"])
    schedule = IndexCacheSchedule.from_pattern(pattern, n) if pattern else None
    return ModelConfig.from_hf_config(hf_config, schedule=schedule, num_mtp_layers=0)


def missing_hf_tensors(names: Any, cfg: Any) -> list[str]:
    """The HF tensors model ``cfg`` needs that ``names`` (a checkpoint's) lacks."""
    from indexcache_train.model.hf_mapping import hf_tensor_names

    have = set(names)
    return [h for h in hf_tensor_names(cfg) if h not in have]


def read_hf_weights(ckpt: Any, cfg: Any) -> dict[str, Any]:
    """Every HF tensor model ``cfg`` needs, read from an ``HFCheckpoint`` (CPU, stored dtype)."""
    from indexcache_train.model.hf_mapping import hf_tensor_names

    return {h: ckpt.read_tensor(h) for h in hf_tensor_names(cfg)}


def _settings(dtype: Any, initialise: bool) -> Any:
    import torch

    from indexcache_train.model.factory import ParallelSettings

    return ParallelSettings(
        moe_token_dispatcher_type="allgather",
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        perform_initialization=initialise,
    )


def random_weights(hf_config: dict[str, Any], seed: int) -> dict[str, Any]:
    """HF-named fp32 weights of an all-Full trunk initialised from ``seed`` (so every schedule
    of the same preset and seed shares them)."""
    import torch

    from indexcache_train import compat
    from indexcache_train.model.factory import build_model, transformer_config
    from indexcache_train.model.hf_mapping import export_hf_state_dict

    cfg = trunk_config(hf_config, "F" * int(hf_config["num_hidden_layers"]))
    compat.model_parallel_seed(seed)
    torch.manual_seed(seed)
    model = build_model(cfg, transformer_config(cfg, _settings(torch.float32, True)))
    return export_hf_state_dict(model, cfg)


def build_loaded(cfg: Any, weights: dict[str, Any], dtype: Any) -> Any:
    """The model of ``cfg`` (one process, TP = PP = 1) holding ``weights``, in eval mode."""
    from indexcache_train.model.factory import build_model, transformer_config
    from indexcache_train.model.hf_mapping import load_hf_state_dict

    model = build_model(cfg, transformer_config(cfg, _settings(dtype, False)))
    load_hf_state_dict(model, cfg, weights)  # Shared layers map no indexer tensors
    return model.eval()
