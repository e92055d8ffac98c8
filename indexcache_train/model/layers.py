"""Megatron layer, block and MTP classes that pass the per-forward ``dsa_state`` explicitly.

Megatron-Core 0.19.2's ``TransformerBlock`` / ``TransformerLayer`` / MTP classes call their children
with a fixed set of keyword arguments, so there is no way to hand a per-micro-batch object to the
attention without storing it somewhere shared. These subclasses add one keyword, ``dsa_state``,
and otherwise reuse Megatron's modules (norms, bias-dropout-add, MLP / MoE forward, MTP embedding
and projection helpers, sharded state dicts). Features the DSA path does not support (inference
contexts, cross-attention, CUDA graphs, CPU offloading, FP8/FP4, Megatron's own packed-sequence
params) are refused at construction (:func:`check_supported`) instead of being ignored.

Full activation recompute is implemented here (not by ``megatron.core.recompute``) so the
checkpointed closure captures ``dsa_state``: a recomputed Shared layer reads its own
micro-batch's forward-time top-k.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlock,
    MultiTokenPredictionLayer,
    get_mtp_layer_offset,
)
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from indexcache_train.model.forward_state import DSAForwardState

_UNSUPPORTED_RECOMPUTE = {"core_attn", "mla_up_proj", "layernorm"}


def check_supported(config: TransformerConfig) -> None:
    """Refuse Megatron features our DSA layers do not implement, naming the fix."""
    problems = []
    if config.fp8 or config.fp4:
        problems.append("fp8/fp4 training (set fp8=None, fp4=None)")
    if getattr(config, "cuda_graph_impl", "none") not in (None, "none"):
        problems.append("CUDA graphs (cuda_graph_impl='none')")
    if config.cpu_offloading or getattr(config, "fine_grained_activation_offloading", False):
        problems.append("activation/weight offloading")
    if config.recompute_granularity == "selective":
        bad = _UNSUPPORTED_RECOMPUTE & set(config.recompute_modules or [])
        if bad:
            problems.append(
                f"selective recompute of {sorted(bad)} (our attention keeps no [S, T] activations; "
                "use recompute_granularity='full' or recompute mlp/moe only)"
            )
    if getattr(config, "mtp_use_repeated_layer", False):
        problems.append("mtp_use_repeated_layer (each MTP depth is its own IndexCache layer)")
    if problems:
        raise ValueError("unsupported with IndexCache DSA layers: " + "; ".join(problems))


def _reject_unused(where: str, **kwargs: Any) -> None:
    for name, value in kwargs.items():
        if value is not None:
            raise ValueError(
                f"{where}: {name} is not supported by the IndexCache DSA layers (got a value); "
                "packed sequences and CP positions travel in DSAForwardState instead"
            )


class DSATransformerLayer(TransformerLayer):
    """``TransformerLayer`` whose attention receives ``dsa_state``."""

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        dsa_state: DSAForwardState,
        padding_mask: torch.Tensor | None = None,
        inference_context: Any = None,
        packed_seq_params: Any = None,
        context: Any = None,
        **_rotary: Any,  # rotary_pos_emb & co.: MLA computes its own RoPE from dsa_state positions
    ) -> tuple[torch.Tensor, None]:
        _reject_unused(
            "DSATransformerLayer",
            inference_context=inference_context,
            packed_seq_params=packed_seq_params,
            context=context,
        )
        residual = hidden_states
        normed = self.input_layernorm(hidden_states)
        attention_output_with_bias = self.self_attention(normed, dsa_state=dsa_state)
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                attention_output_with_bias, residual, self.hidden_dropout
            )
        # MLP / MoE (Megatron's own path: router, dispatchers, shared experts, selective recompute).
        output = self._forward_mlp(hidden_states, None, padding_mask=padding_mask)
        return output, None


class DSATransformerBlock(TransformerBlock):
    """``TransformerBlock`` that threads ``dsa_state`` to every layer and owns full recompute."""

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        *,
        dsa_state: DSAForwardState,
        padding_mask: torch.Tensor | None = None,
        inference_context: Any = None,
        packed_seq_params: Any = None,
        context: Any = None,
        extract_layer_indices: Any = None,
        **_rotary: Any,
    ) -> torch.Tensor:
        _reject_unused(
            "DSATransformerBlock",
            inference_context=inference_context,
            packed_seq_params=packed_seq_params,
            context=context,
        )
        if extract_layer_indices:
            raise ValueError("extract_layer_indices is not supported by DSATransformerBlock")
        if not self.pre_process:
            hidden_states = self.input_tensor  # set by the pipeline schedule (set_input_tensor)
        hidden_states = make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if self.config.sequence_parallel
            else nullcontext()
        )
        with rng:
            recompute = (
                self.config.recompute_granularity == "full"
                and self.training
                and torch.is_grad_enabled()
            )
            for start, end, checkpointed in self._chunks(recompute):
                hidden_states = self._run_chunk(
                    start, end, checkpointed, hidden_states, attention_mask, padding_mask, dsa_state
                )
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
            hidden_states = make_viewless_tensor(
                inp=hidden_states, requires_grad=True, keep_graph=True
            )
        if not self.pre_process and len(self.layers) == 0 and not self.final_layernorm:
            hidden_states = hidden_states.clone()  # an empty stage must not return its input node
        return hidden_states

    def _chunks(self, recompute: bool) -> list[tuple[int, int, bool]]:
        n = len(self.layers)
        if not recompute:
            return [(0, n, False)]
        k = self.config.recompute_num_layers
        if self.config.recompute_method == "uniform":
            return [(s, min(s + k, n), True) for s in range(0, n, k)]
        if self.config.recompute_method == "block":
            return [(i, i + 1, i < k) for i in range(n)]
        raise ValueError(
            f"recompute_method={self.config.recompute_method!r}; use 'uniform' or 'block'"
        )

    def _run_chunk(
        self, start, end, checkpointed, hidden_states, attention_mask, padding_mask, state
    ):
        def run(
            h: torch.Tensor, mask: torch.Tensor | None, pad: torch.Tensor | None
        ) -> torch.Tensor:
            # The closure captures this micro-batch's state, so the recompute in backward sees
            # exactly the entries written during this forward.
            with state.phase_scope(checkpointed):
                for layer in self.layers[start:end]:
                    h, _ = layer(h, mask, dsa_state=state, padding_mask=pad)
            return h

        if not checkpointed:
            return run(hidden_states, attention_mask, padding_mask)
        return tensor_parallel.checkpoint(
            run,
            self.config.distribute_saved_activations,
            hidden_states,
            attention_mask,
            padding_mask,
        )


class DSAMultiTokenPredictionLayer(MultiTokenPredictionLayer):
    """MTP depth whose inner DSA layer receives ``dsa_state`` (global index N + k)."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        padding_mask: torch.Tensor | None = None,
        *,
        dsa_state: DSAForwardState,
        embedding: Any = None,
        packed_seq_params: Any = None,
        inference_params: Any = None,
        context: Any = None,
        **_rotary: Any,
    ):
        _reject_unused(
            "DSAMultiTokenPredictionLayer",
            packed_seq_params=packed_seq_params,
            inference_params=inference_params,
            context=context,
        )
        input_ids, position_ids, padding_mask, decoder_input, hidden_states = self._get_embeddings(
            input_ids=input_ids,
            position_ids=position_ids,
            embedding=embedding,
            hidden_states=hidden_states,
            padding_mask=padding_mask,
        )
        checkpointed = (
            self.config.recompute_granularity == "full"
            and self.training
            and torch.is_grad_enabled()
        )

        def run(
            h: torch.Tensor,
            dec_in: torch.Tensor,
            mask: torch.Tensor | None,
            pad: torch.Tensor | None,
        ):
            with dsa_state.phase_scope(checkpointed):
                h = self._concat_embeddings(h, dec_in)
                h, _ = self.mtp_model_layer(h, mask, dsa_state=dsa_state, padding_mask=pad)
                return self._postprocess(h)

        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if self.config.sequence_parallel
            else nullcontext()
        )
        with rng:
            if checkpointed:
                hidden_states = tensor_parallel.checkpoint(
                    run,
                    self.config.distribute_saved_activations,
                    hidden_states,
                    decoder_input,
                    attention_mask,
                    padding_mask,
                )
            else:
                hidden_states = run(hidden_states, decoder_input, attention_mask, padding_mask)
        return hidden_states, input_ids, position_ids, padding_mask


class DSAMultiTokenPredictionBlock(MultiTokenPredictionBlock):
    """MTP block that threads ``dsa_state`` to its depths."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        padding_mask: torch.Tensor | None = None,
        *,
        dsa_state: DSAForwardState,
        embedding: Any = None,
        packed_seq_params: Any = None,
        **_unused: Any,
    ) -> torch.Tensor:
        _reject_unused("DSAMultiTokenPredictionBlock", packed_seq_params=packed_seq_params)
        offset = get_mtp_layer_offset(self.config, self.vp_stage)
        outputs = list(torch.chunk(hidden_states, 1 + offset, dim=0))
        hidden_states = outputs[offset]
        if self.config.mtp_detach_heads:
            hidden_states = hidden_states.detach()
        for depth in range(self.config.mtp_num_layers):
            hidden_states, input_ids, position_ids, padding_mask = self.layers[depth](
                input_ids=input_ids,
                position_ids=position_ids,
                hidden_states=hidden_states,
                attention_mask=attention_mask,
                padding_mask=padding_mask,
                dsa_state=dsa_state,
                embedding=embedding,
            )
            outputs.append(hidden_states)
        return torch.cat(outputs, dim=0)
