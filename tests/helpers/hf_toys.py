"""Tiny random Hugging Face DSA checkpoints (GLM-5, DeepSeek-V3.2, dense-MLA parents) for tests.

Configs are the transformers 5.17 defaults with only sizes shrunk (routing knobs such as
``n_group`` / ``topk_group`` / ``routed_scaling_factor`` / ``norm_topk_prob`` keep their
defaults). Checkpoints are written by ``save_pretrained(safe_serialization=True)``, so they carry
exactly the names transformers writes (per-expert ``mlp.experts.{e}.*``); an MTP layer
``model.layers.{N}`` (decoder tensors + ``enorm`` / ``hnorm`` / ``eh_proj`` /
``shared_head.norm``) is added by hand in a second shard because transformers does not model it.

Weights are perturbed away from their init values (norms are not all ones, router biases not
zero) so a test that copies the wrong tensor cannot pass by accident. Storage dtypes follow the
releases: bf16, with ``indexer.weights_proj`` and ``e_score_correction_bias`` in fp32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from indexcache_train.model.families import get_family
from indexcache_train.schedule import IndexCacheSchedule

_SIZES: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 256,
}
_INDEXER_SIZES: dict[str, Any] = {"index_topk": 4, "index_head_dim": 16, "index_n_heads": 2}
#: Names of 2-D weights the FP8 releases keep in bf16 (independent of checkpoint_tools.layout).
_NOT_QUANTISED = ("embed_tokens", "lm_head", "mlp.gate.weight", "weights_proj", "shared_head.head")


def make_glm5_toy_config(**overrides: Any) -> Any:
    """``GlmMoeDsaConfig`` with tiny sizes (4 layers, 8 experts, hidden 64)."""
    from transformers import GlmMoeDsaConfig

    return GlmMoeDsaConfig(**{**_SIZES, **_INDEXER_SIZES, "n_routed_experts": 8, **overrides})


def make_dsv32_toy_config(**overrides: Any) -> Any:
    """``DeepseekV32Config`` with tiny sizes.

    16 experts: the default ``n_group=8`` needs at least 2 experts per group (the router takes the
    top-2 per group), so 8 experts would break a forward pass.
    """
    from transformers import DeepseekV32Config

    return DeepseekV32Config(**{**_SIZES, **_INDEXER_SIZES, "n_routed_experts": 16, **overrides})


def make_dense_mla_toy_config(model_type: str = "glm4_moe_lite", **overrides: Any) -> Any:
    """A dense-MLA parent (``glm4_moe_lite`` or ``deepseek_v3``): no indexers."""
    family = get_family(model_type)
    if family.has_indexers:
        raise ValueError(f"{model_type} is not a dense-MLA family")
    sizes = dict(_SIZES)
    if not family.reads_first_k_dense_replace:
        del sizes["first_k_dense_replace"]
    # DeepSeek's n_group 8 needs >= 2 experts per group (the router takes the top-2 per group).
    experts = 16 if family.hf_defaults.get("n_group", 1) > 1 else 8
    return family.hf_config_class()(**{**sizes, "n_routed_experts": experts, **overrides})


def model_class(config: Any) -> Any:
    """The ``*ForCausalLM`` class of a toy config."""
    return get_family(config.model_type).hf_model_class()


def save_toy_checkpoint(
    cfg: Any,
    directory: str | Path,
    with_mtp: bool = True,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.bfloat16,
    fused_experts: bool = False,
) -> Path:
    """Save a random model for ``cfg`` as an HF checkpoint directory.

    Args:
        cfg: a transformers config (e.g. from :func:`make_glm5_toy_config`).
        directory: output directory (created).
        with_mtp: add MTP layer ``model.layers.{N}`` in its own shard and set
            ``num_nextn_predict_layers: 1``.
        seed: torch seed for weights.
        dtype: storage dtype of everything except the fp32 tensors.
        fused_experts: store routed experts as ``mlp.experts.gate_up_proj`` / ``down_proj``
            (a raw state-dict dump) instead of ``save_pretrained``'s per-expert names.
    """
    directory = Path(directory)
    torch.manual_seed(seed)
    model = model_class(cfg)(cfg)
    _perturb_and_cast(model, dtype)
    model.save_pretrained(directory, safe_serialization=True)
    if fused_experts:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    if with_mtp:
        _add_mtp_layer(directory, seed, dtype)
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}) + "\n")
    return directory


def quantize_fp8_blockwise(
    weight: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference block quantisation: per block ``scale = amax / 448``, ``q = w / scale`` in e4m3.

    Returns ``(q, scale_inv)`` with ``w ~= q * scale_inv`` per block (DeepSeek's convention).
    """
    out_dim, in_dim = weight.shape
    rows, cols = math.ceil(out_dim / block[0]), math.ceil(in_dim / block[1])
    q = torch.empty(out_dim, in_dim, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(rows):
        for j in range(cols):
            rs = slice(i * block[0], min((i + 1) * block[0], out_dim))
            cs = slice(j * block[1], min((j + 1) * block[1], in_dim))
            w = weight[rs, cs].float()
            scale = max(w.abs().max().item(), 1e-12) / 448.0
            q[rs, cs] = (w / scale).to(torch.float8_e4m3fn)
            scale_inv[i, j] = scale
    return q, scale_inv


def make_fp8_checkpoint(
    src: str | Path, dst: str | Path, block: tuple[int, int] = (128, 128)
) -> Path:
    """Copy an HF toy checkpoint with every 2-D linear weight quantised to e4m3 + scale_inv."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for shard in sorted(src.glob("*.safetensors")):
        out = {}
        for name, tensor in load_file(shard).items():
            if (
                tensor.dim() == 2
                and name.endswith(".weight")
                and not any(s in name for s in _NOT_QUANTISED)
            ):
                out[name], out[name + "_scale_inv"] = quantize_fp8_blockwise(tensor, block)
            else:
                out[name] = tensor
        save_file(out, dst / shard.name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, shard.name))
    if (src / "model.safetensors.index.json").exists():
        total = sum(
            t.numel() * t.element_size()
            for s in dst.glob("*.safetensors")
            for t in load_file(s).values()
        )
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def read_all(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (small) checkpoint directory, via safetensors itself."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


# ---------------------------------------------------------------------- internals
def _perturb_and_cast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
        for name, buf in model.named_buffers():
            if "e_score_correction_bias" in name:
                buf.copy_(torch.randn_like(buf) * 0.1)
    model.to(dtype)
    for name, module in model.named_modules():
        # The releases store these two in fp32; transformers keeps the bias strictly fp32.
        if name.endswith("indexer"):
            module.weights_proj.float()
        if name.endswith("mlp.gate"):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()


def _add_mtp_layer(directory: Path, seed: int, dtype: torch.dtype) -> None:
    """Move the trunk into shard 1 and write MTP layer N (shaped like layer N-1) into shard 2."""
    config = json.loads((directory / "config.json").read_text())
    n = config["num_hidden_layers"]
    config["num_nextn_predict_layers"] = 1
    trunk = load_file(directory / "model.safetensors")
    schedule = IndexCacheSchedule.from_hf_config(config)
    gen = torch.Generator().manual_seed(seed + 1)
    mtp: dict[str, torch.Tensor] = {}
    last = f"model.layers.{n - 1}."
    for name, tensor in trunk.items():
        if not name.startswith(last):
            continue
        if ".self_attn.indexer." in name and not schedule.is_full(n):
            continue
        mtp[f"model.layers.{n}." + name[len(last) :]] = _random_like(name, tensor, gen)
    dsa = any(".self_attn.indexer." in k for k in trunk)
    if dsa and schedule.is_full(n) and not any(".self_attn.indexer." in k for k in mtp):
        raise ValueError("the MTP layer is Full but layer N-1 has no indexer to shape it after")
    hidden = config["hidden_size"]
    for part, shape in (
        ("enorm", (hidden,)),
        ("hnorm", (hidden,)),
        ("shared_head.norm", (hidden,)),
    ):
        mtp[f"model.layers.{n}.{part}.weight"] = (1 + 0.05 * torch.randn(shape, generator=gen)).to(
            dtype
        )
    mtp[f"model.layers.{n}.eh_proj.weight"] = (
        0.02 * torch.randn(hidden, 2 * hidden, generator=gen)
    ).to(dtype)
    (directory / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": trunk, "model-00002-of-00002.safetensors": mtp}
    weight_map = {}
    for shard_name, tensors in shards.items():
        save_file(tensors, directory / shard_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard_name))
    total = sum(
        t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values()
    )
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def _random_like(name: str, tensor: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    values = torch.randn(tensor.shape, generator=gen) * 0.05
    if tensor.dim() == 1 and not name.endswith("bias"):
        values = values + 1.0  # norm weights live around one
    return values.to(tensor.dtype)
