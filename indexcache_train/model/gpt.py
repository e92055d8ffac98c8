"""``IndexCacheGPTModel``: Megatron's ``GPTModel`` with DSA blocks and an explicit ``dsa_state``.

It *is* a ``GPTModel`` (Megatron's schedules, DDP, optimizer, dist-checkpointing and utilities see
the type they expect) and reuses ``GPTModel.forward`` / ``_postprocess`` (embedding, MTP loss
processing, output layer, LM loss). Only construction differs: ``GPTModel.__init__`` hard-codes
the stock ``TransformerBlock`` / ``MultiTokenPredictionBlock``, so this class builds the same
attributes itself (mirroring megatron-core 0.19.2 ``GPTModel.__init__`` for the training path:
no RoPE module — MLA owns its RoPE —, no inference or CUDA-graph setup) with the DSA blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlockSubmodules,
    mtp_on_this_rank,
)
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from indexcache_train.model.forward_state import DSAForwardState
from indexcache_train.model.layers import (
    DSAMultiTokenPredictionBlock,
    DSATransformerBlock,
    check_supported,
)
from indexcache_train.model.lm_loss import chunked_lm_loss


class IndexCacheGPTModel(GPTModel):
    """GPT model whose decoder and MTP blocks are DSA blocks with Full / Shared layers."""

    def __init__(
        self,
        config: TransformerConfig,
        decoder_spec: TransformerBlockSubmodules,
        vocab_size: int,
        max_sequence_length: int,
        mtp_spec: MultiTokenPredictionBlockSubmodules | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        share_embeddings_and_output_weights: bool = False,
        parallel_output: bool = True,
        pg_collection: ProcessGroupCollection | None = None,
        vp_stage: int | None = None,
        lm_loss_chunk: int = 0,
    ) -> None:
        check_supported(config)
        # Tokens per chunk of the LM head + loss (0: Megatron's whole-sequence logits).
        self.lm_loss_chunk = lm_loss_chunk
        # Deliberately skip GPTModel.__init__ (it would build the stock blocks); LanguageModule
        # sets up process groups exactly as GPTModel's super() call does.
        LanguageModule.__init__(self, config=config, pg_collection=pg_collection)
        self.transformer_layer_spec = decoder_spec
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.pre_process = pre_process
        self.post_process = post_process
        self.fp16_lm_cross_entropy = False
        self.parallel_output = parallel_output
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.vp_stage = vp_stage
        self.disable_param_offloading = True
        self.position_embedding_type = "none"  # MLA applies RoPE itself, from dsa_state positions
        self.model_type = ModelType.encoder_or_decoder
        self.max_position_embeddings = max_sequence_length
        self.rotary_percent = 1.0
        self.rotary_base = 10000
        self.rotary_scaling = False
        self.rotary_pos_emb_cache: dict = {}
        self.mtp_block_spec = mtp_spec
        self.mtp_process = mtp_spec is not None and mtp_on_this_rank(
            layout=config.pipeline_model_parallel_layout,
            mtp_num_layers=config.mtp_num_layers,
            ignore_virtual=False,
            vp_stage=vp_stage,
        )
        if self.pre_process or self.mtp_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=vocab_size,
                max_sequence_length=max_sequence_length,
                position_embedding_type="none",
                tp_group=self.pg_collection.tp,
            )
        self.decoder = DSATransformerBlock(
            config=config,
            spec=decoder_spec,
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=self.pg_collection,
            vp_stage=vp_stage,
        )
        if self.mtp_process:
            self.mtp = DSAMultiTokenPredictionBlock(
                config=config, spec=mtp_spec, vp_stage=vp_stage, pg_collection=self.pg_collection
            )
        if self.post_process:
            self.embedding_activation_buffer = None
            self.grad_output_buffer = None
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=not parallel_output,
                skip_weight_param_allocation=pre_process and share_embeddings_and_output_weights,
                tp_group=self.pg_collection.tp,
            )
        if self.pre_process or self.post_process or self.mtp_process:
            self.setup_embeddings_and_output_layer()

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        dsa_state: DSAForwardState,
        loss_mask: torch.Tensor | None = None,
        decoder_input: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
        padding_mask: torch.Tensor | None = None,
        **unsupported: Any,
    ) -> torch.Tensor:
        """Logits ``[B, S, V]`` (no labels) or per-token LM loss ``[B, S]`` (last stage); hidden
        states on other pipeline stages. ``dsa_state`` carries positions, key ranges and top-k."""
        if unsupported:
            raise ValueError(
                f"IndexCacheGPTModel.forward: unsupported argument(s) {sorted(unsupported)}"
            )
        stage_input = None if self.pre_process else self.decoder.input_tensor
        chunked = labels is not None and self.post_process and self.lm_loss_chunk > 0
        output = super().forward(
            input_ids,
            position_ids,
            attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            extra_block_kwargs={"dsa_state": dsa_state},
            runtime_gather_output=runtime_gather_output,
            loss_mask=loss_mask,
            padding_mask=padding_mask,
            output_processor=chunked_lm_loss(self.lm_loss_chunk) if chunked else None,
        )
        return dsa_state.attach_pending(output, stage_input)
