"""Model FLOPs per training step (what MFU divides by), counting what IndexCache changes.

Model FLOPs are the matmuls the model's math needs once; work an implementation repeats to save
memory or to fuse kernels is not counted:

* Main attention: dense causal over all earlier keys (warm-up), or the absorbed MQA form over the
  selected keys only, min(k, t+1) per row (sparse stage).
* The lightning indexer of each Full layer, forward: projections and scores over every causal
  key (for the top-k in the sparse stage; for the distillation target's key set in the dense
  stage, when a distillation loss needs it).
* Indexer training (distillation on): the backward of each Full indexer once, through the keys
  its loss sees (the selected keys in the sparse stage, all causal keys in the dense stage). The
  gradients of all layers a Full indexer serves meet at its logits, so serving more layers adds
  no model FLOPs; the target is the head-summed attention probabilities the layers' attention
  already produced.
* Not counted: the per-served-layer recompute of the source indexer's q/k/w and of the target
  logits that the distillation kernels perform, and activation (full / selective) recompute.
* A frozen trunk (warm-up) runs forward only; a trained one forward + backward (3x).

Matmul FLOPs only (2 per multiply-add); softmax/norm/elementwise work is ignored, as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

from indexcache_train.model.config import ModelConfig


@dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one step, split by what IndexCache changes."""

    trunk: float
    """The layers (attention, MLP / MoE) and the LM head (MTP included), forward (+ backward)."""
    indexer: float
    """Forward of the Full layers' indexers."""
    distill: float
    """Backward of the Full layers' indexers from the distillation loss."""

    @property
    def total(self) -> float:
        return self.trunk + self.indexer + self.distill


def _avg_keys_sparse(seq: int, k: int) -> float:
    """Mean over causal rows of min(k, t+1) valid keys."""
    if k >= seq:
        return (seq + 1) / 2
    return (k * (k + 1) / 2 + k * (seq - k)) / seq


def _avg_keys(cfg: ModelConfig, seq: int, attention: str) -> float:
    """Mean keys per query row the attention (and the indexer loss) sees in a stage."""
    return (seq + 1) / 2 if attention == "dense" else _avg_keys_sparse(seq, cfg.index_topk)


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
    keys = _avg_keys(cfg, seq, attention)
    if attention == "dense":
        f += 2 * r_kv * H * (nope + v)  # expanded k/v
        f += 2 * H * (nope + rope + v) * keys
    else:
        f += 2 * H * nope * r_kv + 2 * H * r_kv * v  # absorb q, un-absorb output
        f += 2 * H * (r_kv + rope + r_kv) * keys
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
    """One Full layer's indexer forward: projections + scores over every causal key."""
    return (
        indexer_projection_flops_per_token(cfg)
        + 2 * cfg.index_n_heads * cfg.index_head_dim * (seq + 1) / 2
    )


def indexer_backward_flops_per_token(cfg: ModelConfig, seq: int, attention: str) -> float:
    """One Full indexer's backward from its distillation loss (2x the forward through the keys
    the loss sees, plus 2x its projections), however many layers it serves."""
    scores = 2 * cfg.index_n_heads * cfg.index_head_dim * _avg_keys(cfg, seq, attention)
    return 2 * (indexer_projection_flops_per_token(cfg) + scores)


def step_flops(
    cfg: ModelConfig, seq: int, tokens: int, attention: str, trunk_trained: bool, distill_mode: str
) -> StepFlops:
    """Whole-model FLOPs for ``tokens`` tokens (all micro-batches, all data-parallel ranks)."""
    mult = 3.0 if trunk_trained else 1.0
    layers = range(cfg.num_layers + cfg.num_mtp_layers)
    trunk = sum(layer_trunk_flops_per_token(cfg, i, seq, attention) for i in layers)
    trunk += 2 * cfg.hidden_size * cfg.vocab_size * (1 + cfg.num_mtp_layers)
    trunk += cfg.num_mtp_layers * 2 * 2 * cfg.hidden_size * cfg.hidden_size  # eh_proj
    n_full = sum(1 for i in layers if cfg.schedule.is_full(i))
    trains_indexers = distill_mode != "none"
    # The sparse stage scores every causal key for the top-k; the dense warm-up attends all keys
    # and runs the indexer only for its distillation loss.
    runs_indexer = attention == "sparse" or trains_indexers
    indexer = n_full * indexer_flops_per_token(cfg, seq) if runs_indexer else 0.0
    distill = (
        n_full * indexer_backward_flops_per_token(cfg, seq, attention) if trains_indexers else 0.0
    )
    return StepFlops(trunk * mult * tokens, indexer * tokens, distill * tokens)


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def device_peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None
