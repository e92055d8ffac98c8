"""Which head dims the Triton kernels take, how the triton backend uses that, and the config check.

The kernels themselves run on the GPU (tests/gpu) and under the interpreter
(test_kernels_interpret); here: the rules, that the triton backend's hooks decline dims no kernel
takes with the reason (so ``auto`` falls back to PyTorch and ``triton`` names it; the dispatch
itself: test_kernel_backends.py), and that validation refuses such a model up front.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from indexcache_train.config.compose import compose
from indexcache_train.config.validate import ConfigError, validate
from indexcache_train.model.config import ModelConfig
from indexcache_train.model.presets import PRESETS, preset_hf_config
from indexcache_train.ops import backend_triton as bt
from indexcache_train.ops import kernel_dims as kd
from indexcache_train.ops.backends import Declined

pytestmark = pytest.mark.unit


def _cuda_like(*shape: int, dtype: str = "torch.bfloat16") -> SimpleNamespace:
    """A stand-in CUDA tensor: the hooks read only ``is_cuda``, ``device``, ``dtype`` and
    ``shape`` before they decline (no GPU here)."""
    return SimpleNamespace(is_cuda=True, device="cuda:0", dtype=dtype, shape=shape)


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


def test_triton_hooks_decline_dims_no_kernel_takes() -> None:
    kv = _cuda_like(1, 8, 40)
    out = bt.sparse_mla(
        q_BSHD=_cuda_like(1, 8, 2, 40), kv_BTD=kv, topk_BSK=None, softmax_scale=1.0, v_dim=32
    )
    assert isinstance(out, Declined) and "40 = 32 + 8" in out.reason
    out = bt.indexer_topk(
        q_BSID=_cuda_like(1, 8, 2, 24), k_BTD=None, w_BSI=None, topk=4, softmax_scale=1.0,
        key_range=None,
    )  # fmt: skip
    assert isinstance(out, Declined) and "indexer head dim 24" in out.reason
    cpu = SimpleNamespace(is_cuda=False, device="cpu", shape=(1, 8, 2, 576))
    out = bt.sparse_mla(q_BSHD=cpu, kv_BTD=None, topk_BSK=None, softmax_scale=1.0, v_dim=512)
    assert isinstance(out, Declined) and "inputs are on cpu" in out.reason


def test_triton_hooks_decline_float32_before_the_dims() -> None:
    # fp32 tiles overflowed shared memory on an H100 (#24's fp32 evaluation) and tl.dot would
    # run them in TF32: the hooks decline, so auto runs the exact fp32 reference.
    assert kd.dtype_reason("torch.bfloat16") is None
    assert "float16; the Triton kernels take bfloat16" in kd.dtype_reason("torch.float16")
    out = bt.sparse_mla(
        q_BSHD=_cuda_like(1, 8, 2, 576, dtype="torch.float32"), kv_BTD=None, topk_BSK=None,
        softmax_scale=1.0, v_dim=512,
    )  # fmt: skip
    assert isinstance(out, Declined) and "inputs are float32" in out.reason
    out = bt.dense_distill(
        attn_q_BSHD=_cuda_like(1, 8, 2, 192, dtype="torch.float32"), attn_k_BTHD=None,
        attn_lse_BSH=None, key_range=None, attn_scale=1.0,
        idx_q_BSID=_cuda_like(1, 8, 2, 128, dtype="torch.float32"), idx_k_BTD=None,
        idx_w_BSI=None, idx_scale=1.0, split=None,
    )  # fmt: skip
    assert isinstance(out, Declined) and "inputs are float32" in out.reason


def test_validation_refuses_triton_for_a_float32_model() -> None:
    cfg = compose(["+experiment=toy_gpu", "model.kernel_backend=triton", "optim.bf16=false"])
    with pytest.raises(ConfigError, match=r"kernel_backend=triton.*inputs are float32"):
        validate(cfg, 1)
    validate(compose(["+experiment=toy_gpu", "optim.bf16=false"]), 1)  # auto: the reference


def test_validation_refuses_triton_for_dims_no_kernel_takes() -> None:
    cfg = compose(["+experiment=toy", "model.kernel_backend=triton"])
    with pytest.raises(ConfigError, match=r"kernel_backend=triton.*40 = 32 \+ 8"):
        validate(cfg, 1)
    # auto runs the same model (PyTorch where no kernel applies)
    validate(compose(["+experiment=toy", "model.kernel_backend=auto"]), 1)


def test_gpu_toy_runs_the_kernels() -> None:
    # tests/gpu/test_train_gpu.py forces kernel_backend=triton on this experiment.
    validate(compose(["+experiment=toy_gpu", "model.kernel_backend=triton"]), 1)


def test_validation_takes_triton_for_the_dense_warm_up_at_tp2() -> None:
    # The fused dense distillation kernel takes a TP split (ops/triton_distill.py): the GPU toy
    # validates with kernel_backend=triton at TP2+SP as at TP1.
    tp2 = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
    validate(compose(["+experiment=toy_gpu", "model.kernel_backend=triton", *tp2]), 2)


def test_validation_names_the_backends() -> None:
    with pytest.raises(
        ConfigError, match=r"model.kernel_backend='cuda'.*'auto', 'torch', 'triton'"
    ):
        validate(compose(["+experiment=toy", "model.kernel_backend=cuda"]), 1)
