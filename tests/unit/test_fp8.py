"""Block-scaled FP8: dequantisation against an independent reference, checks, conversion."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_tools.convert_schedule import ScheduleRequest, convert_schedule
from checkpoint_tools.errors import DtypeMismatchError, Fp8ScaleMissingError, UnexpectedTensorError
from checkpoint_tools.fp8 import (
    block_size_from_config,
    dequantize_blockwise,
    expected_scale_shape,
    read_dequantized,
    scale_name,
)
from checkpoint_tools.hf_io import HFCheckpoint
from checkpoint_tools.validation import validate_hf_checkpoint
from tests.helpers.hf_toys import (
    make_fp8_checkpoint,
    make_glm5_toy_config,
    quantize_fp8_blockwise,
    read_all,
    save_toy_checkpoint,
)


def reference_dequantize(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """Block by block, the way DeepSeek's ``weight_dequant`` kernel defines it."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rs = slice(i * block[0], (i + 1) * block[0])
            cs = slice(j * block[1], (j + 1) * block[1])
            out[rs, cs] = q[rs, cs].to(torch.float32) * scale_inv[i, j].item()
    return out.to(torch.bfloat16)


@pytest.mark.parametrize(
    ("shape", "block"), [((300, 200), (128, 128)), ((128, 256), (128, 128)), ((7, 5), (4, 2))]
)
def test_dequantize_matches_reference(shape: tuple[int, int], block: tuple[int, int]) -> None:
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3).to(torch.bfloat16)
    q, scale_inv = quantize_fp8_blockwise(weight, block)
    assert tuple(scale_inv.shape) == expected_scale_shape(shape, block)
    ours = dequantize_blockwise(q, scale_inv, block)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, reference_dequantize(q, scale_inv, block))
    # And it is a dequantisation: e4m3 keeps 3 mantissa bits (relative error <= 2^-4 per element).
    rel = (ours.float() - weight.float()).abs() / weight.float().abs().clamp_min(1e-3)
    assert rel.max() < 0.07
    # Edge blocks are partial: a scale that differs per block must not leak across the edge.
    assert not torch.equal(scale_inv[0, 0], scale_inv[-1, -1])


def test_dequantize_rejects_wrong_scale_shape() -> None:
    q = torch.zeros(300, 200, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"expected \[3, 2\]"):
        dequantize_blockwise(q, torch.ones(2, 2))


def test_block_size_from_config() -> None:
    assert block_size_from_config({}) == (128, 128)
    assert block_size_from_config({"quantization_config": {"weight_block_size": [64, 32]}}) == (
        64,
        32,
    )
    with pytest.raises(ValueError):
        block_size_from_config({"quantization_config": {"weight_block_size": [0, 32]}})


@pytest.fixture(scope="module")
def fp8_toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fp8")
    bf16 = save_toy_checkpoint(make_glm5_toy_config(num_hidden_layers=6), root / "bf16")
    # 32 x 16 blocks: the toy's matrices span several blocks, some partial.
    return make_fp8_checkpoint(bf16, root / "fp8", block=(32, 16))


def test_read_dequantized_on_a_checkpoint(fp8_toy: Path) -> None:
    ckpt = HFCheckpoint(fp8_toy)
    raw = read_all(fp8_toy)
    name = "model.layers.2.self_attn.q_b_proj.weight"
    assert raw[name].dtype == torch.float8_e4m3fn
    expected = reference_dequantize(raw[name], raw[scale_name(name)], (32, 16))
    assert torch.equal(read_dequantized(ckpt, name), expected)
    norm = "model.layers.2.input_layernorm.weight"
    assert torch.equal(read_dequantized(ckpt, norm), raw[norm])  # not FP8: returned as stored
    assert validate_hf_checkpoint(ckpt).ok


def test_fp8_weight_without_scale(fp8_toy: Path, tmp_path: Path) -> None:
    bad = _rewrite(
        fp8_toy, tmp_path / "noscale", drop="model.layers.1.self_attn.o_proj.weight_scale_inv"
    )
    ckpt = HFCheckpoint(bad)
    with pytest.raises(
        Fp8ScaleMissingError, match=re.escape("model.layers.1.self_attn.o_proj.weight")
    ) as err:
        read_dequantized(ckpt, "model.layers.1.self_attn.o_proj.weight")
    assert "model-00001-of-00002.safetensors" in str(err.value)  # names the shard
    with pytest.raises(Fp8ScaleMissingError, match="without its"):
        validate_hf_checkpoint(ckpt).raise_if_errors()


def test_wrong_scale_shape_and_stray_scale(fp8_toy: Path, tmp_path: Path) -> None:
    name = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    bad = _rewrite(fp8_toy, tmp_path / "shape", replace={name: torch.ones(1, 1)})
    with pytest.raises(Fp8ScaleMissingError, match="does not fit"):
        validate_hf_checkpoint(bad).raise_if_errors()
    norm_scale = "model.layers.1.input_layernorm.weight_scale_inv"
    bad = _rewrite(fp8_toy, tmp_path / "stray", replace={norm_scale: torch.ones(1, 1)})
    with pytest.raises(UnexpectedTensorError, match=re.escape(norm_scale)):
        validate_hf_checkpoint(bad).raise_if_errors()


def test_fp8_without_quantization_config(fp8_toy: Path, tmp_path: Path) -> None:
    bad = _rewrite(fp8_toy, tmp_path / "noquant")
    config = json.loads((bad / "config.json").read_text())
    del config["quantization_config"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(DtypeMismatchError, match="quantization_config"):
        validate_hf_checkpoint(bad).raise_if_errors()


def test_convert_keeps_fp8_and_scales(fp8_toy: Path, tmp_path: Path) -> None:
    shared = convert_schedule(fp8_toy, tmp_path / "shared", ScheduleRequest(4, 3))
    assert shared.schedule_out.pattern == "FFFSSS"
    before, after = read_all(fp8_toy), read_all(tmp_path / "shared")
    dropped = {n for n in before if re.match(r"model\.layers\.[345]\.self_attn\.indexer\.", n)}
    assert any(n.endswith("wq_b.weight_scale_inv") for n in dropped)  # scales go with their weights
    assert set(after) == set(before) - dropped
    assert all(_same_bits(after[n], before[n]) for n in after)
    back = convert_schedule(tmp_path / "shared", tmp_path / "back", ScheduleRequest(1))
    assert back.indexer_from == {0: 0, 1: 1, 2: 2, 3: 2, 4: 2, 5: 2, 6: 6}
    restored = read_all(tmp_path / "back")
    assert set(restored) == set(before)
    for name, tensor in restored.items():
        source = re.sub(r"layers\.[345]\.self_attn\.indexer", "layers.2.self_attn.indexer", name)
        assert _same_bits(tensor, before[source]), name
    assert restored["model.layers.3.self_attn.indexer.wq_b.weight"].dtype == torch.float8_e4m3fn


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    )


def _rewrite(
    src: Path, dst: Path, drop: str | None = None, replace: dict[str, torch.Tensor] | None = None
) -> Path:
    """Copy a checkpoint dropping or replacing tensors in shard 1 (keeping the index in sync)."""
    import shutil

    shutil.copytree(src, dst)
    shard = dst / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    if drop:
        del tensors[drop]
    tensors.update(replace or {})
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k != drop}
    index["weight_map"].update(dict.fromkeys(replace or {}, shard.name))
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst
