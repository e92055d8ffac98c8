"""MLA self-attention with DeepSeek Sparse Attention and IndexCache (Full / Shared layers).

Built from a Megatron ``ModuleSpec`` (see :mod:`indexcache_train.model.specs`) with Megatron's
tensor-parallel linears and Megatron-Core parameter names (``linear_q_down_proj``, ``q_layernorm``,
``linear_q_up_proj``, ``linear_kv_down_proj``, ``kv_layernorm``, ``linear_kv_up_proj``,
``linear_proj``, ``core_attention.indexer.*``). The q norm is a standalone module whose output
feeds both the q up-projection and the indexer (HF convention; Megatron's TE spec in 0.16 fed the
indexer the pre-norm latent, which selects wrong top-k).

Two MLA forms, chosen by the stage (``DSAForwardState.attention``):

* ``dense`` (warm-up): the *expanded* form, per-head keys/values from ``linear_kv_up_proj``;
  dense causal attention with LSE (cuDNN / our kernels on GPU, the chunked reference on CPU).
* ``sparse``: the *absorbed* (MQA) form the sparse kernels need: ``q_nope`` is folded through the
  key half of ``linear_kv_up_proj`` into the 512-dim latent, every head attends one shared latent
  key ``[c_kv | k_rope]`` (576 dims) at its top-k positions, and the value half is applied to the
  per-head latent output afterwards. Mathematically identical to the expanded form.

Layout: Megatron hands us ``[S, B, H]`` (``S/tp`` rows under sequence parallelism); ops work
batch-first, so tensors are transposed once here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from indexcache_train.loss.autoscaler import attach_loss
from indexcache_train.loss.eval_sample import MeasuredRows
from indexcache_train.loss.recall import head_sum_probs_all_keys, topk_recall
from indexcache_train.model.dims import MLADims
from indexcache_train.model.forward_state import DSAForwardState
from indexcache_train.model.rope import RotaryTables, apply_rope
from indexcache_train.ops import api as ops
from indexcache_train.ops.distill_reference import head_sum_probs_dense
from indexcache_train.ops.masking import KeyRange
from indexcache_train.ops.row_split import RowSplit
from indexcache_train.parallel.context_parallel import gather_sequence
from indexcache_train.schedule import IndexCacheSchedule


@dataclass
class DSASelfAttentionSubmodules:
    linear_q_down_proj: ModuleSpec | type
    q_layernorm: ModuleSpec | type
    linear_q_up_proj: ModuleSpec | type
    linear_kv_down_proj: ModuleSpec | type
    kv_layernorm: ModuleSpec | type
    linear_kv_up_proj: ModuleSpec | type
    core_attention: ModuleSpec | type
    linear_proj: ModuleSpec | type


@dataclass
class DSACoreAttentionSubmodules:
    #: The indexer spec on Full layers; ``None`` on Shared layers (no indexer parameters at all).
    indexer: ModuleSpec | None = None


class DSACoreAttention(MegatronModule):
    """Holds the Full layer's indexer; owns top-k selection and the distillation term."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: DSACoreAttentionSubmodules,
        dims: MLADims,
        layer_index: int,
        schedule: IndexCacheSchedule,
    ) -> None:
        super().__init__(config=config)
        self.dims, self.layer_index, self.schedule = dims, layer_index, schedule
        is_full = schedule.is_full(layer_index)
        if is_full != (submodules.indexer is not None):
            raise ValueError(
                f"layer {layer_index} is {'Full' if is_full else 'Shared'} in the schedule but its "
                f"spec {'lacks' if is_full else 'has'} an indexer"
            )
        self.indexer = (
            build_module(submodules.indexer, config=config, dims=dims) if is_full else None
        )

    @property
    def is_full(self) -> bool:
        return self.indexer is not None


class DSASelfAttention(MegatronModule):
    """MLA + DSA self-attention; see the module docstring."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: DSASelfAttentionSubmodules,
        layer_number: int,
        dims: MLADims,
        schedule: IndexCacheSchedule,
        layer_index: int | None = None,
        kernel_backend: str = "auto",
        pg_collection: ProcessGroupCollection | None = None,
        **unused: Any,  # attn_mask_type, cp_comm_type, name: Megatron passes them to every attention
    ) -> None:
        super().__init__(config=config)
        if pg_collection is None:
            raise ValueError("DSASelfAttention needs Megatron's pg_collection (tp, cp groups)")
        self.dims = dims
        # Trunk layers derive their 0-based global index from Megatron's 1-based layer_number
        # (offset by the pipeline stage); MTP layers are numbered per depth by Megatron, so their
        # spec passes the global index explicitly.
        self.layer_index = layer_number - 1 if layer_index is None else layer_index
        self.schedule = schedule
        self.kernel_backend = kernel_backend
        self.tp_group = pg_collection.tp
        tp_size = self.tp_group.size() if self.tp_group is not None else 1
        if dims.num_heads % tp_size:
            raise ValueError(f"num_attention_heads={dims.num_heads} not divisible by TP={tp_size}")
        self.heads = dims.num_heads // tp_size
        self.sequence_parallel = bool(config.sequence_parallel) and tp_size > 1
        # The indexer and the distillation terms run on this rank's own rows under SP.
        self.row_split = RowSplit.build(self.tp_group, self.sequence_parallel)
        cp = getattr(pg_collection, "cp", None)
        # Context parallel: queries stay local, keys (latent KV, RoPE keys, indexer keys) are
        # all-gathered over the CP group in natural order (indexcache_train.parallel.context_parallel).
        self.cp_group = cp if cp is not None and cp.size() > 1 else None
        self.cp_size = cp.size() if self.cp_group is not None else 1

        col = dict(
            config=config,
            init_method=config.init_method,
            bias=False,
            skip_bias_add=False,
            gather_output=False,
            is_expert=False,
            tp_group=self.tp_group,
        )
        dup = dict(config=config, init_method=config.init_method, bias=False, skip_bias_add=False)
        self.linear_q_down_proj = build_module(
            submodules.linear_q_down_proj, dims.hidden_size, dims.q_lora_rank, **dup
        )
        self.q_layernorm = build_module(
            submodules.q_layernorm,
            config=config,
            hidden_size=dims.q_lora_rank,
            eps=dims.latent_norm_eps,
        )
        self.linear_q_up_proj = build_module(
            submodules.linear_q_up_proj, dims.q_lora_rank, dims.num_heads * dims.qk_head_dim, **col
        )
        self.linear_kv_down_proj = build_module(
            submodules.linear_kv_down_proj,
            dims.hidden_size,
            dims.kv_lora_rank + dims.qk_rope_head_dim,
            **dup,
        )
        self.kv_layernorm = build_module(
            submodules.kv_layernorm,
            config=config,
            hidden_size=dims.kv_lora_rank,
            eps=dims.latent_norm_eps,
        )
        self.linear_kv_up_proj = build_module(
            submodules.linear_kv_up_proj,
            dims.kv_lora_rank,
            dims.num_heads * (dims.qk_nope_head_dim + dims.v_head_dim),
            **col,
        )
        self.core_attention = build_module(
            submodules.core_attention,
            config=config,
            dims=dims,
            layer_index=self.layer_index,
            schedule=schedule,
        )
        self.linear_proj = build_module(
            submodules.linear_proj,
            dims.num_heads * dims.v_head_dim,
            dims.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_group=self.tp_group,
        )
        # Under SP each TP rank down-projects its own slice of tokens: the replicated down
        # projections then hold partial gradients that must be summed over TP (Megatron does
        # this for parameters tagged ``sequence_parallel``). Without SP their gradients are
        # already identical on every rank (the column-parallel up projections all-reduce the
        # input gradient), so they must not be reduced again.
        # (Megatron's finalize_model_grads averages parameters tagged
        # ``average_gradients_across_tp_domain`` *before* considering ``sequence_parallel``, so
        # the DuplicatedLinear default tag must be cleared here.)
        for p in (*self.linear_q_down_proj.parameters(), *self.linear_kv_down_proj.parameters()):
            p.sequence_parallel = self.sequence_parallel
            p.average_gradients_across_tp_domain = False
        self.rotary = RotaryTables(dims.rope, dims.qk_rope_head_dim, dims.max_position_embeddings)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        dsa_state: DSAForwardState,
        **unused: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states``: post-norm ``[S, B, h]`` (``[S/tp, B, h]`` under SP)."""
        if dsa_state is None:
            raise ValueError(
                "DSASelfAttention needs the per-forward dsa_state; call the model through "
                "IndexCacheGPTModel.forward(..., dsa_state=...)"
            )
        dims = self.dims
        q_lat = self.q_layernorm(self.linear_q_down_proj(hidden_states)[0])
        kv_a = self.linear_kv_down_proj(hidden_states)[0]
        c_kv, k_pe = kv_a.split([dims.kv_lora_rank, dims.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_layernorm(c_kv)
        q = self.linear_q_up_proj(q_lat)[0]  # column-parallel: gathers SP rows itself
        S, B = q.shape[:2]
        q_SBHD = q.view(S, B, self.heads, dims.qk_head_dim)
        k_pe = self._gather_rows(k_pe)

        cos, sin = dsa_state.rotary(self.rotary, q.dtype)
        q_nope_BSHD = q_SBHD[..., : dims.qk_nope_head_dim].transpose(0, 1)
        q_pe_BSHR = apply_rope(
            q_SBHD[..., dims.qk_nope_head_dim :].transpose(0, 1), cos, sin, dims.rope_interleave
        )
        k_pe_BTR = apply_rope(k_pe.transpose(0, 1), cos, sin, dims.rope_interleave)
        if self.cp_group is not None and dsa_state.key_range is None:
            raise ValueError(
                "context parallel needs DSAForwardState.key_range with each local row's global "
                "position (query_index); the trainer builds it from the zigzag split"
            )
        key_range = dsa_state.key_range or KeyRange.causal(B, S, q.device)

        # The indexer reads this rank's own rows (SP-local hidden states and q latent).
        step = _LayerStep(self, dsa_state, hidden_states, q_lat, cos, sin, key_range)
        if dsa_state.attention == "dense":
            out_BSHV = self._dense(q_nope_BSHD, q_pe_BSHR, c_kv, k_pe_BTR, step)
        else:
            out_BSHV = self._sparse(q_nope_BSHD, q_pe_BSHR, self._gather_rows(c_kv), k_pe_BTR, step)
        out_SBX = out_BSHV.transpose(0, 1).reshape(S, B, self.heads * dims.v_head_dim)
        return self.linear_proj(out_SBX)

    def _gather_rows(self, t_SBX: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:
            return t_SBX
        return gather_from_sequence_parallel_region(t_SBX, group=self.tp_group)

    def gather_keys_BT(self, t_BTX: torch.Tensor) -> torch.Tensor:
        """This CP rank's key rows -> the whole sequence's, natural order (identity without CP)."""
        if self.cp_group is None:
            return t_BTX
        return gather_sequence(t_BTX.transpose(0, 1), self.cp_group).transpose(0, 1)

    def gather_own_keys(self, k_BND: torch.Tensor) -> torch.Tensor:
        """Keys computed from this rank's own rows -> every key (SP, then CP; the backward
        reduce-scatters each rank's gradient to the rows' owners)."""
        return self.gather_keys_BT(self._gather_rows(k_BND.transpose(0, 1)).transpose(0, 1))

    def _column_parallel(self, linear: torch.nn.Module, x_SBX: torch.Tensor) -> torch.Tensor:
        """A column-parallel projection of rows that are already whole on every TP rank.

        Used for the dense warm-up's K/V up projection under context parallelism: its input is
        the CP-gathered latent, which Megatron's ColumnParallelLinear would all-gather again
        under SP. The input gradient is summed over TP (heads are split over TP ranks) by the
        SP gather's reduce-scatter, or by ``copy_to_tensor_model_parallel_region`` without SP.
        """
        if not self.sequence_parallel and self.tp_group is not None and self.tp_group.size() > 1:
            x_SBX = copy_to_tensor_model_parallel_region(x_SBX, group=self.tp_group)
        return torch.nn.functional.linear(x_SBX, linear.weight)

    def _kv_up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head key/value halves of ``linear_kv_up_proj``: ``[H, nope, r]``, ``[H, v, r]``."""
        d = self.dims
        w = self.linear_kv_up_proj.weight.view(
            self.heads, d.qk_nope_head_dim + d.v_head_dim, d.kv_lora_rank
        )
        return w[:, : d.qk_nope_head_dim], w[:, d.qk_nope_head_dim :]

    # ------------------------------------------------------------------ dense (warm-up)
    def _dense(self, q_nope, q_pe, c_kv_SBR, k_pe_BTR, step: _LayerStep) -> torch.Tensor:
        d = self.dims
        if self.cp_group is None:
            kv = self.linear_kv_up_proj(c_kv_SBR)[0]  # gathers SP rows itself
        else:
            latent = self.gather_keys_BT(self._gather_rows(c_kv_SBR).transpose(0, 1)).transpose(
                0, 1
            )
            kv = self._column_parallel(self.linear_kv_up_proj, latent)
            k_pe_BTR = self.gather_keys_BT(k_pe_BTR)
        T = kv.shape[0]
        kv_BTHX = kv.view(T, -1, self.heads, d.qk_nope_head_dim + d.v_head_dim).transpose(0, 1)
        k_nope, v_BTHV = kv_BTHX.split([d.qk_nope_head_dim, d.v_head_dim], dim=-1)
        q_BSHD = torch.cat([q_nope, q_pe], -1)
        k_BTHD = torch.cat([k_nope, k_pe_BTR[:, :, None].expand(-1, -1, self.heads, -1)], -1)
        # Dense attention needs no top-k; the recall metric does (a Shared layer: its source's).
        topk_own = step.select_topk() if step.state.measure_recall else None
        step.publish(topk_own)
        out, lse = ops.dense_attention(
            q_BSHD=q_BSHD,
            k_BTHD=k_BTHD,
            v_BTHV=v_BTHV,
            softmax_scale=d.softmax_scale,
            key_range=step.key_range,
            backend=self.kernel_backend,
        )
        # Evaluation measures a sample of the rows (identity otherwise).
        q_m, lse_m = step.measured.rows(q_BSHD.detach()), step.measured.rows(lse)
        if topk_own is not None:
            step.record_recall(
                topk_own,
                lambda a0, a1, valid: head_sum_probs_dense(
                    q_m[:, a0:a1], k_BTHD.detach(), lse_m[:, a0:a1], valid, d.softmax_scale
                ),
            )
        return step.add_term(
            out,
            lambda iq, ik, iw, scale: ops.dense_distill(
                attn_q_BSHD=q_m,
                attn_k_BTHD=k_BTHD.detach(),
                attn_lse_BSH=lse_m,
                key_range=step.measured_range,
                attn_scale=d.softmax_scale,
                idx_q_BSID=iq,
                idx_k_BTD=ik,
                idx_w_BSI=iw,
                idx_scale=scale,
                split=self.row_split,
                backend=self.kernel_backend,
                chunk=step.state.distill.chunk,
            ),
        )

    # ------------------------------------------------------------------ sparse
    def _sparse(self, q_nope, q_pe, c_kv_SBR, k_pe_BTR, step: _LayerStep) -> torch.Tensor:
        d = self.dims
        w_uk_HNR, w_uv_HVR = self._kv_up_weights()
        q_abs_BSHD = torch.cat([torch.einsum("bshn,hnr->bshr", q_nope, w_uk_HNR), q_pe], -1)
        kv_BTD = self.gather_keys_BT(torch.cat([c_kv_SBR.transpose(0, 1), k_pe_BTR], -1))
        topk_own = step.select_topk()
        step.publish(topk_own)
        # The attention runs every row for this rank's heads: gather the rows' top-k.
        topk_BSK = self.row_split.gather_rows(topk_own)
        if step.state.captured_topk is not None:
            step.state.captured_topk[self.layer_index] = topk_BSK
        lat_BSHR, lse = ops.sparse_mla(
            q_BSHD=q_abs_BSHD,
            kv_BTD=kv_BTD,
            topk_BSK=topk_BSK,
            softmax_scale=d.softmax_scale,
            v_dim=d.kv_lora_rank,
            deterministic=bool(self.config.deterministic_mode),
            backend=self.kernel_backend,
        )
        # Evaluation measures a sample of the rows (identity otherwise).
        q_m, lse_m = step.measured.rows(q_abs_BSHD.detach()), step.measured.rows(lse)
        if step.state.measure_recall:
            step.record_recall(
                topk_own,
                lambda a0, a1, valid: head_sum_probs_all_keys(
                    q_m[:, a0:a1], kv_BTD.detach(), valid, d.softmax_scale
                ),
            )
        out = torch.einsum("bshr,hvr->bshv", lat_BSHR, w_uv_HVR)
        return step.add_term(
            out,
            lambda iq, ik, iw, scale: ops.sparse_distill(
                attn_q_BSHD=q_m,
                attn_kv_BTD=kv_BTD.detach(),
                attn_lse_BSH=lse_m,
                topk_BSK=step.measured.rows(topk_BSK),
                attn_scale=d.softmax_scale,
                idx_q_BSID=iq,
                idx_k_BTD=ik,
                idx_w_BSI=iw,
                idx_scale=scale,
                split=self.row_split,
                backend=self.kernel_backend,
                chunk=step.state.distill.chunk,
            ),
        )


class _LayerStep:
    """One layer's forward against the per-forward state: top-k, publishing, distillation term.

    "Rows" are the attention's (every CP-local row; ``S``); "own rows" the ``N`` of them this
    TP rank's indexer and distillation terms handle (its sequence-parallel slice, or all).
    """

    def __init__(
        self, attn: DSASelfAttention, state: DSAForwardState, x_NBH, qr_NBR, cos, sin, key_range
    ) -> None:
        self.attn, self.state, self.key_range = attn, state, key_range
        self.split = attn.row_split
        self.own_rows = x_NBH.shape[0]
        self.num_keys = cos.shape[1] * attn.cp_size  # all key positions (SP- and CP-gathered)
        first = self.split.rank * self.own_rows
        self.own_range = key_range.rows(first, first + self.own_rows)
        self.cos, self.sin = (t[:, first : first + self.own_rows] for t in (cos, sin))
        # Evaluation (recall, per-pair KL without gradients) measures a sample of the rows.
        sampled = state.measure_recall and not state.distill.compute_grad
        positions_S = key_range.query_index_BS[0]  # global positions (CP: zigzag order)
        self.measured = (
            MeasuredRows.build(
                state.eval_rows, positions_S, self.num_keys, self.split.slices, self.split.rank
            )
            if sampled
            else MeasuredRows()
        )
        self.measured_range = self.measured.key_range(key_range)
        core = attn.core_attention
        self.layer = attn.layer_index
        self.is_full = core.is_full
        mode = state.distill.mode
        # Entries carry the source's top-k (sparse stage) and, for the multi-layer loss, its
        # detached indexer inputs; consumers must read exactly when the source publishes.
        self.needs_entry = state.attention == "sparse" or mode == "multi" or state.measure_recall
        self.reads_entry = self.needs_entry and (not self.is_full or state.is_recompute)
        self.entry = state.read(self.layer) if self.reads_entry else None
        self.x_BNH = x_NBH.detach().transpose(0, 1)
        self.qr_BNR = qr_NBR.detach().transpose(0, 1)
        # A term is due on Full layers (multi and own_layer) and on Shared layers (multi only);
        # never in a checkpointed chunk's first pass: it is built when the chunk is recomputed.
        self.term_due = (
            mode != "none" and state.phase != "checkpoint" and (self.is_full or mode == "multi")
        )
        self.proj = self._source_projection() if self.term_due else None

    def _indexer_outputs(self, indexer, x_BNH, qr_BNR):
        """The indexer's q, w of the own rows and its keys of every row (gathered once)."""
        iq, ik, iw = indexer(x_BNH, qr_BNR, self.cos, self.sin)
        return iq, self.attn.gather_own_keys(ik), iw

    def _source_projection(self):
        """The source indexer's (q, k, w), recomputed from its detached inputs, with grad."""
        if self.is_full:
            indexer, x, qr = self.attn.core_attention.indexer, self.x_BNH, self.qr_BNR
        else:
            indexer = self.entry.indexer
            x, qr = (t.transpose(0, 1) for t in self.entry.indexer_inputs)
        with torch.set_grad_enabled(self.state.distill.compute_grad):
            return (*self._indexer_outputs(indexer, x, qr), indexer.softmax_scale)

    def select_topk(self) -> torch.Tensor:
        """The top-k of this rank's own rows (a Shared layer: its source's)."""
        if self.entry is not None:
            return self.entry.topk_BSK
        indexer = self.attn.core_attention.indexer
        if self.proj is not None:
            iq, ik, iw = (t.detach() for t in self.proj[:3])
        else:
            with torch.no_grad():
                iq, ik, iw = self._indexer_outputs(indexer, self.x_BNH, self.qr_BNR)
        return ops.indexer_topk(
            q_BSID=iq,
            k_BTD=ik,
            w_BSI=iw,
            topk=self.attn.dims.index_topk,
            softmax_scale=indexer.softmax_scale,
            key_range=self.own_range,
            backend=self.attn.kernel_backend,
        )

    def publish(self, topk_BNK: torch.Tensor | None) -> None:
        """Own rows only, as produced: the top-k and (multi) the indexer's inputs."""
        if self.is_full and self.needs_entry and not self.state.is_recompute:
            multi = self.state.distill.mode == "multi"
            inputs = (self.x_BNH.transpose(0, 1), self.qr_BNR.transpose(0, 1)) if multi else None
            self.state.put(self.layer, topk_BNK, inputs, self.attn.core_attention.indexer)

    def record_recall(self, topk_BNK: torch.Tensor, probs_fn) -> None:
        """Evaluation metric: recall of the top-k this layer uses against its own attention.

        ``probs_fn(a0, a1, valid_BCT)`` gives this rank's heads' summed probabilities of the
        attention's rows ``a0:a1`` over all keys; the rows of every slice are reduced over the
        TP ranks onto their owner, so each rank ranks all heads' mass for its own rows.
        """
        num_keys, key_range = self.num_keys, self.measured_range
        n = self.measured.count(self.own_rows)

        def partial(a0: int, a1: int) -> torch.Tensor:
            return probs_fn(a0, a1, key_range.rows(a0, a1).dense_mask(num_keys))

        first = self.split.rank * n
        value = topk_recall(
            lambda s0, s1: self.split.reduced_rows(partial, s0, s1, n),
            key_range.rows(first, first + n),
            self.measured.own(topk_BNK),
            self.attn.dims.index_topk,
            num_keys,
            self.state.distill.chunk,
        )
        self.state.record_recall(self.layer, value)

    def add_term(self, out_BSHV: torch.Tensor, term_fn) -> torch.Tensor:
        if not self.term_due:
            return out_BSHV
        schedule = self.attn.schedule
        source = schedule.source(self.layer)
        group = (source, *schedule.consumers(source))
        weight = self.state.distill.weight(group.index(self.layer), len(group))
        # Normalised like the LM loss. Per-token mode (``calculate_per_token_loss``): a plain sum,
        # Megatron divides every gradient by the global token count. Otherwise per query row of
        # the whole sequence: under CP each rank holds 1/cp of the rows and Megatron scales
        # auxiliary losses by cp, so the local sum is divided by the global row count.
        # Under SP this rank's term covers its own rows; the row count is the whole sequence's.
        own_rows = out_BSHV.shape[0] * self.measured.count(self.own_rows)
        all_rows = out_BSHV.shape[0] * out_BSHV.shape[1] * self.attn.cp_size
        rows = 1 if self.attn.config.calculate_per_token_loss else all_rows
        with torch.set_grad_enabled(self.state.distill.compute_grad):
            iq, ik, iw, scale = self.proj
            kl_sum = term_fn(self.measured.own(iq), ik, self.measured.own(iw), scale)
            # Scaled inside the grad-enabled block: a frozen trunk runs under no_grad, and a
            # product taken there would be a graph-less constant (the indexers would not learn).
            loss = kl_sum * (weight * self.state.distill.loss_coeff / rows)
        self.state.record_kl(source, self.layer, kl_sum.detach() / own_rows)  # per-row mean
        if weight == 0.0 or not kl_sum.requires_grad:
            return out_BSHV
        if torch.is_grad_enabled():
            return attach_loss(out_BSHV, loss)
        # Frozen trunk (dense warm-up runs it without an autograd graph): there is no
        # activation to carry the term, so the model attaches it to its output instead.
        self.state.pending_losses.append(loss)
        return out_BSHV
