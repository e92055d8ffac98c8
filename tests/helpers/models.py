"""Build tiny IndexCache models (and their HF twins) for tests."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from indexcache_train.model.config import ModelConfig
from indexcache_train.model.factory import ParallelSettings, build_model, transformer_config
from indexcache_train.model.forward_state import DistillSettings, DSAForwardState

CPU_PARALLEL = ParallelSettings(moe_token_dispatcher_type="allgather")


def build_toy(hf_config: dict[str, Any], par: ParallelSettings = CPU_PARALLEL, **kw: Any):
    cfg = ModelConfig.from_hf_config(hf_config)
    model = build_model(cfg, transformer_config(cfg, par), **kw)
    return cfg, model


def state(cfg: ModelConfig, batch: int, seq: int, **kw: Any) -> DSAForwardState:
    pos = torch.arange(seq).expand(batch, seq)
    distill = kw.pop("distill", DistillSettings())
    return DSAForwardState(cfg.schedule, pos, distill=distill, **kw)


def perturbed_hf_model(
    model_cls: Any, hf_config: dict[str, Any], seed: int = 0, noise: float = 0.05
):
    """A random HF model whose norms / router biases are not at their trivial init values."""
    torch.manual_seed(seed)
    config_cls = model_cls.config_class
    cfg = config_cls(**{k: v for k, v in hf_config.items() if k != "num_nextn_predict_layers"})
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn_like(b) * 0.1)
    return model


def hf_file_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The tensors as the checkpoint file stores them (per-expert names), via save_pretrained."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(os.path.join(d, f)))
        return out
