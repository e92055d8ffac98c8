"""Which head dims the Triton kernels take, how the dispatch uses that, and the config check.

The kernels themselves run on the GPU (tests/gpu) and under the interpreter
(test_kernels_interpret); here: the rules, that ``auto`` falls back to PyTorch for dims no kernel
takes, that ``triton`` names the reason, and that validation refuses such a model up front.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from indexcache_train.config.compose import compose
from indexcache_train.config.validate import ConfigError, validate
from indexcache_train.model.config import ModelConfig
from indexcache_train.model.presets import PRESETS, preset_hf_config
from indexcache_train.ops import kernel_dims as kd
from indexcache_train.ops.api import _use_kernel

pytestmark = pytest.mark.unit

CUDA_LIKE = SimpleNamespace(is_cuda=True, device="cuda:0")  # the dispatch reads only these


def _dims_reasons(m: ModelConfig) -> list[str | None]:
    absorbed = m.kv_lora_rank + m.qk_rope_head_dim
    return [
        kd.indexer_dims(m.index_head_dim),
        kd.sparse_mla_dims(absorbed, m.kv_lora_rank),
        kd.distill_dims(absorbed, m.index_head_dim, 1.0),
        kd.distill_dims(m.qk_head_dim, m.index_head_dim, 1.0),
        kd.dense_attention_dims(m.qk_head_dim, m.v_head_dim),
    ]


@pytest.mark.parametrize("preset", [p for p in sorted(PRESETS) if "toy" not in p])
def test_every_real_model_size_fits_the_kernels(preset: str) -> None:
    m = ModelConfig.from_hf_config(preset_hf_config(preset), num_mtp_layers=0)
    assert _dims_reasons(m) == [None] * 5


def test_toy_dims_are_named() -> None:
    m = ModelConfig.from_hf_config(preset_hf_config("glm5_toy"), num_mtp_layers=0)
    reasons = _dims_reasons(m)
    assert reasons[0] is None  # indexer head dim 16
    assert "40 = 32 + 8" in reasons[1] and "qk_rope_head_dim >= 16" in reasons[1]
    assert "24 = 16 + 8" in reasons[4]


@pytest.mark.parametrize(
    ("dim", "ok"), [(576, True), (192, True), (128, True), (48, True), (40, False), (24, False)]
)
def test_two_tile_split(dim: int, ok: bool) -> None:
    assert (kd.dense_attention_dims(dim, 128) is None) is ok


def test_sparse_mla_needs_the_latent_as_the_power_of_two_part() -> None:
    assert kd.sparse_mla_dims(576, 512) is None
    assert "power-of-two part" in kd.sparse_mla_dims(576, 256)
    assert kd.sparse_mla_dims(512, 512) is not None  # no RoPE tile
    assert "not a sum of two powers of two" in kd.sparse_mla_dims(100, 64)


def test_auto_falls_back_and_triton_names_the_reason() -> None:
    assert _use_kernel("auto", CUDA_LIKE, True, "sparse MLA", None)
    assert not _use_kernel("auto", CUDA_LIKE, True, "sparse MLA", "qk dim 40 ...")
    assert not _use_kernel("auto", CUDA_LIKE, False, "sparse MLA", None)
    assert not _use_kernel("torch", CUDA_LIKE, True, "sparse MLA", None)
    assert _use_kernel("triton", CUDA_LIKE, True, "sparse MLA", None)
    with pytest.raises(RuntimeError, match=r"sparse MLA kernel.*qk dim 40.*kernel_backend=auto"):
        _use_kernel("triton", CUDA_LIKE, True, "sparse MLA", "qk dim 40 ...")
    with pytest.raises(RuntimeError, match="device cpu"):
        _use_kernel("triton", SimpleNamespace(is_cuda=False, device="cpu"), True, "x", None)


def test_validation_refuses_triton_for_dims_no_kernel_takes() -> None:
    cfg = compose(["+experiment=toy", "model.kernel_backend=triton"])
    with pytest.raises(ConfigError, match=r"kernel_backend=triton.*40 = 32 \+ 8"):
        validate(cfg, 1)
    # auto runs the same model (PyTorch where no kernel applies)
    validate(compose(["+experiment=toy", "model.kernel_backend=auto"]), 1)


def test_gpu_toy_runs_the_kernels() -> None:
    # tests/gpu/test_train_gpu.py forces kernel_backend=triton on this experiment.
    validate(compose(["+experiment=toy_gpu", "model.kernel_backend=triton"]), 1)
