"""Model FLOPs (``training.flops``): what MFU counts and what it leaves out."""

from __future__ import annotations

import pytest

from indexcache_train.model.config import ModelConfig
from indexcache_train.model.toy_configs import glm5_toy_hf_config
from indexcache_train.training.flops import layer_trunk_flops_per_token, step_flops

SEQ = 32  # toy index_topk is 8 < SEQ, so the sparse stage selects


def _toy(freq: int) -> ModelConfig:
    # 8 layers, no MTP; freq 4 / offset 1 -> FSSSFSSS (2 Full), freq 1 -> all 8 Full.
    return ModelConfig.from_hf_config(
        glm5_toy_hf_config(
            num_mtp_layers=0, num_hidden_layers=8, index_topk_freq=freq, index_skip_topk_offset=1
        )
    )


# The toy's indexer, by hand: q_lora 48, hidden 64, 4 heads x 16.
PROJ = 2 * 48 * 4 * 16 + 2 * 64 * 16 + 2 * 64 * 4  # wq_b + wk + weights_proj = 8704
SPARSE_KEYS = (8 * 9 / 2 + 8 * (SEQ - 8)) / SEQ  # mean over rows of min(8, t + 1) = 7.125
DENSE_KEYS = (SEQ + 1) / 2


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_serving_more_layers_adds_no_model_flops(attention: str) -> None:
    # multi: each Full indexer distils the 4 layers it serves; own_layer: only its own. The
    # per-served-layer recompute of the indexer and of the target is implementation work.
    cfg = _toy(4)
    trained = attention == "sparse"
    multi = step_flops(cfg, SEQ, SEQ, attention, trained, "multi")
    own = step_flops(cfg, SEQ, SEQ, attention, trained, "own_layer")
    assert multi == own


@pytest.mark.parametrize(("attention", "keys"), [("sparse", SPARSE_KEYS), ("dense", DENSE_KEYS)])
def test_indexer_forward_and_backward_once_per_full_layer(attention: str, keys: float) -> None:
    cfg = _toy(4)
    f = step_flops(cfg, SEQ, SEQ, attention, attention == "sparse", "multi")
    # Forward scores every causal key (top-k or the dense target's key set); the backward
    # runs through the keys the loss sees: twice the forward's matmuls there.
    forward = PROJ + 2 * 4 * 16 * DENSE_KEYS
    backward = 2 * (PROJ + 2 * 4 * 16 * keys)
    assert f.indexer == pytest.approx(2 * SEQ * forward)
    assert f.distill == pytest.approx(2 * SEQ * backward)


def test_no_distillation_no_indexer_training() -> None:
    cfg = _toy(4)
    sparse = step_flops(cfg, SEQ, SEQ, "sparse", True, "none")
    assert sparse.distill == 0 and sparse.indexer > 0  # the top-k still needs the scores
    dense = step_flops(cfg, SEQ, SEQ, "dense", True, "none")
    assert dense.distill == 0 and dense.indexer == 0  # nothing reads the indexer


def test_indexcache_saves_exactly_the_shared_layers_indexers() -> None:
    full, freq4 = _toy(1), _toy(4)
    a = step_flops(full, SEQ, SEQ, "sparse", True, "multi")
    b = step_flops(freq4, SEQ, SEQ, "sparse", True, "multi")
    assert a.trunk == b.trunk
    forward = PROJ + 2 * 4 * 16 * DENSE_KEYS
    backward = 2 * (PROJ + 2 * 4 * 16 * SPARSE_KEYS)
    assert a.total - b.total == pytest.approx((8 - 2) * SEQ * (forward + backward))


def test_sparse_attention_counts_selected_keys_only() -> None:
    # Past index_topk the per-token attention work stops growing with the sequence (2048 keys
    # of 576 + 512 dims, 16 heads); dense attention keeps growing linearly.
    cfg = ModelConfig.from_hf_config(
        glm5_toy_hf_config(
            num_mtp_layers=0,
            num_attention_heads=16,
            num_key_value_heads=16,
            kv_lora_rank=512,
            qk_rope_head_dim=64,
            index_topk=2048,
            index_head_dim=128,
        )
    )
    per_key = 2 * 16 * (512 + 64 + 512)

    def attn(seq: int, attention: str) -> float:
        return layer_trunk_flops_per_token(cfg, 0, seq, attention)

    far = attn(1 << 20, "sparse") - attn(1 << 19, "sparse")
    assert far == pytest.approx(per_key * 2048 * 2047 / 2 * (1 / 2**19 - 1 / 2**20), rel=1e-9)
    assert attn(1 << 20, "dense") - attn(1 << 19, "dense") > 1000 * abs(far)


def test_frozen_trunk_counts_forward_only() -> None:
    cfg = _toy(4)
    trained = step_flops(cfg, SEQ, SEQ, "dense", True, "multi")
    frozen = step_flops(cfg, SEQ, SEQ, "dense", False, "multi")
    assert trained.trunk == pytest.approx(3 * frozen.trunk)
    assert (trained.indexer, trained.distill) == (frozen.indexer, frozen.distill)
