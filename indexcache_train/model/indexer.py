"""The lightning indexer of a Full layer (Shared layers have none).

Parameter names follow Megatron-Core / Megatron-Bridge (``linear_wq_b``, ``linear_wk``, ``k_norm``,
``linear_weights_proj``) so the HF mapping is a plain rename. The projections are replicated on
every tensor-parallel rank; under sequence parallelism each rank projects its own rows (keys are
gathered afterwards) and Megatron sums the partial gradients over TP, without SP every rank
projects every row and Megatron averages — either way the TP=1 gradients.

Inputs are always detached (facts section 3): the indexer is trained only by the distillation loss
and never sends gradient into the trunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from indexcache_train.model.dims import MLADims
from indexcache_train.model.rope import apply_rope


@dataclass
class IndexerSubmodules:
    linear_wq_b: ModuleSpec | type
    linear_wk: ModuleSpec | type
    k_norm: ModuleSpec | type
    linear_weights_proj: ModuleSpec | type


class LightningIndexer(MegatronModule):
    """Projects ``(x, q_resid)`` to indexer queries, keys and head weights."""

    def __init__(
        self, config: TransformerConfig, submodules: IndexerSubmodules, dims: MLADims
    ) -> None:
        super().__init__(config=config)
        self.dims = dims
        n_i, d_i = dims.index_n_heads, dims.index_head_dim
        linear = dict(
            config=config, init_method=config.init_method, bias=False, skip_bias_add=False
        )
        self.linear_wq_b = build_module(
            submodules.linear_wq_b, dims.q_lora_rank, n_i * d_i, **linear
        )
        self.linear_wk = build_module(submodules.linear_wk, dims.hidden_size, d_i, **linear)
        self.k_norm = build_module(
            submodules.k_norm, config=config, hidden_size=d_i, eps=dims.index_k_norm_eps
        )
        # HF keeps weights_proj in fp32 (``_keep_in_fp32_modules``): head weights multiply large
        # ReLU sums, and bf16 weights visibly perturb the top-k.
        self.linear_weights_proj = build_module(
            submodules.linear_weights_proj,
            dims.hidden_size,
            n_i,
            params_dtype=torch.float32,
            **linear,
        )
        self.softmax_scale = d_i**-0.5
        # Under sequence parallelism each TP rank runs the indexer (and its distillation terms)
        # on its own rows only (ops/row_split.py), so its gradients are partial sums: Megatron
        # sums parameters tagged ``sequence_parallel`` over TP, as for norms under SP. Without
        # SP every rank runs every row and holds the full gradient: average
        # (``average_gradients_across_tp_domain``, which Megatron checks first), never sum.
        sp = bool(config.sequence_parallel)
        for p in self.parameters():
            p.sequence_parallel = sp
            p.average_gradients_across_tp_domain = not sp

    def forward(
        self,
        x_BSH: torch.Tensor,
        qr_BSR: torch.Tensor,
        cos_BSF: torch.Tensor,
        sin_BSF: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``q_BSID``, ``k_BSD`` (RoPE applied to the first ``qk_rope`` dims) and ``w_BSI``.

        ``w`` includes HF's ``index_n_heads ** -0.5``; the ``index_head_dim ** -0.5`` score scale
        is applied inside the scoring op (:attr:`softmax_scale`).
        """
        B, S, _ = x_BSH.shape
        dims = self.dims
        q_BSID = self.linear_wq_b(qr_BSR)[0].view(B, S, dims.index_n_heads, dims.index_head_dim)
        k_BSD = self.k_norm(self.linear_wk(x_BSH)[0])
        r = dims.qk_rope_head_dim
        interleaved = dims.indexer_rope_interleave
        q_BSID = torch.cat(
            [apply_rope(q_BSID[..., :r], cos_BSF, sin_BSF, interleaved), q_BSID[..., r:]], -1
        )
        k_BSD = torch.cat(
            [apply_rope(k_BSD[..., :r], cos_BSF, sin_BSF, interleaved), k_BSD[..., r:]], -1
        )
        w_BSI = self.linear_weights_proj(x_BSH.to(self.linear_weights_proj.weight.dtype))[0]
        return q_BSID, k_BSD, w_BSI.float() * dims.index_n_heads**-0.5
