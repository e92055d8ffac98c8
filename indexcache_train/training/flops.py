"""Model FLOPs per training step, counting what IndexCache changes.

* The lightning indexer (projections + O(S^2) scoring) only on Full layers, forward only (top-k
  is not differentiated).
* The distillation recompute: per served layer, the source indexer is recomputed from its
  detached inputs (projections + logits on the key set, forward + backward) and the target p is
  re-derived from the layer's attention (forward only).
* Main attention: dense causal over all keys (warm-up) or the absorbed MQA form over min(k, t)
  keys (sparse stage).
* A frozen trunk (warm-up) runs forward only; a trained one forward + backward (3x).

Matmul FLOPs only (2 per multiply-add); softmax/norm/elementwise work is ignored, as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

from indexcache_train.model.config import ModelConfig


@dataclass(frozen=True)
class StepFlops:
    trunk: float
    indexer: float
    distill: float

    @property
    def total(self) -> float:
        return self.trunk + self.indexer + self.distill


def _avg_keys_sparse(seq: int, k: int) -> float:
    """Mean over causal rows of min(k, t+1) valid keys."""
    if k >= seq:
        return (seq + 1) / 2
    return (k * (k + 1) / 2 + k * (seq - k)) / seq


def layer_trunk_flops_per_token(cfg: ModelConfig, layer: int, seq: int, attention: str) -> float:
    h, H = cfg.hidden_size, cfg.num_attention_heads
    r_q, r_kv, nope, rope, v = (
        cfg.q_lora_rank,
        cfg.kv_lora_rank,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
    )
    f = 2 * h * r_q + 2 * r_q * H * (nope + rope) + 2 * h * (r_kv + rope) + 2 * H * v * h
    if attention == "dense":
        f += 2 * r_kv * H * (nope + v)  # expanded k/v
        f += 2 * H * (nope + rope + v) * (seq + 1) / 2
    else:
        f += 2 * H * nope * r_kv + 2 * H * r_kv * v  # absorb q, un-absorb output
        f += 2 * H * (r_kv + rope + r_kv) * _avg_keys_sparse(seq, cfg.index_topk)
    if cfg.is_moe_layer(layer):
        f += 2 * h * cfg.n_routed_experts
        f += (
            3 * 2 * h * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
        )
    else:
        f += 3 * 2 * h * cfg.intermediate_size
    return f


def indexer_projection_flops_per_token(cfg: ModelConfig) -> float:
    n_i, d_i = cfg.index_n_heads, cfg.index_head_dim
    return 2 * cfg.q_lora_rank * n_i * d_i + 2 * cfg.hidden_size * d_i + 2 * cfg.hidden_size * n_i


def indexer_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """One Full layer's indexer: projections + scoring every causal key (fwd only)."""
    return (
        indexer_projection_flops_per_token(cfg)
        + 2 * cfg.index_n_heads * cfg.index_head_dim * (seq + 1) / 2
    )


def distill_flops_per_token(cfg: ModelConfig, seq: int, attention: str) -> float:
    """One served layer's term: target p (fwd) + source indexer recompute (fwd + bwd)."""
    H, n_i, d_i = cfg.num_attention_heads, cfg.index_n_heads, cfg.index_head_dim
    keys = (seq + 1) / 2 if attention == "dense" else _avg_keys_sparse(seq, cfg.index_topk)
    qk = cfg.qk_head_dim if attention == "dense" else cfg.kv_lora_rank + cfg.qk_rope_head_dim
    target = 2 * H * qk * keys
    predict = indexer_projection_flops_per_token(cfg) + 2 * n_i * d_i * keys
    return target + 3 * predict


def step_flops(
    cfg: ModelConfig, seq: int, tokens: int, attention: str, trunk_trained: bool, distill_mode: str
) -> StepFlops:
    """Whole-model FLOPs for ``tokens`` tokens (all micro-batches, all data-parallel ranks)."""
    mult = 3.0 if trunk_trained else 1.0
    layers = range(cfg.num_layers + cfg.num_mtp_layers)
    trunk = sum(layer_trunk_flops_per_token(cfg, i, seq, attention) for i in layers)
    trunk += 2 * cfg.hidden_size * cfg.vocab_size * (1 + cfg.num_mtp_layers)
    trunk += cfg.num_mtp_layers * 2 * 2 * cfg.hidden_size * cfg.hidden_size  # eh_proj
    s = cfg.schedule
    full = [i for i in layers if s.is_full(i)]
    # The indexer scores keys only in the sparse stage (the dense warm-up attends everything);
    # its projections still run whenever a distillation term needs them.
    indexer = len(full) * (indexer_flops_per_token(cfg, seq) if attention == "sparse" else 0.0)
    served = 0
    if distill_mode == "multi":
        served = len(list(layers))
    elif distill_mode == "own_layer":
        served = len(full)
    distill = served * distill_flops_per_token(cfg, seq, attention)
    return StepFlops(trunk * mult * tokens, indexer * tokens, distill * tokens)


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def device_peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None
