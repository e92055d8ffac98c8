"""``MLADims``: the attention/indexer sizes a layer module needs, taken from :class:`ModelConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from indexcache_train.model.config import ModelConfig, RopeConfig


@dataclass(frozen=True)
class MLADims:
    hidden_size: int
    num_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    softmax_scale: float
    rope: RopeConfig
    max_position_embeddings: int
    rope_interleave: bool
    indexer_rope_interleave: bool
    latent_norm_eps: float
    index_k_norm_eps: float

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def absorbed_dim(self) -> int:
        """Query/key width in the absorbed (MQA) form: latent + rope (576 for GLM-5)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> MLADims:
        return cls(
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_attention_heads,
            q_lora_rank=cfg.q_lora_rank,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim,
            qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim,
            index_n_heads=cfg.index_n_heads,
            index_head_dim=cfg.index_head_dim,
            index_topk=cfg.index_topk,
            softmax_scale=cfg.softmax_scale(),
            rope=cfg.rope,
            max_position_embeddings=cfg.max_position_embeddings,
            rope_interleave=cfg.rope_interleave,
            indexer_rope_interleave=cfg.indexer_rope_interleave,
            latent_norm_eps=cfg.latent_norm_eps,
            index_k_norm_eps=cfg.index_k_norm_eps,
        )
