"""Per-micro-batch forward state: positions, key ranges, and the top-k each Shared layer reuses.

One :class:`DSAForwardState` is created for every micro-batch forward and passed *explicitly* down
the model (``GPTModel.forward(..., extra_block_kwargs={"dsa_state": state})`` -> block -> layer ->
attention). It is never stored on the config object or a mask tensor (Megatron-Core 0.19.2 falls
back to the config object when there is neither an attention mask nor packed-sequence params,
which mixes micro-batches under pipelining and recompute).

Recompute safety: our block captures the state in the closure it checkpoints, so a recomputed
layer reads the entries of *its own* micro-batch, written at forward time. A Full layer that is
recomputed reuses its forward-time top-k instead of re-running the O(S^2) indexer, so forward and
recompute see identical indices by construction.

Lifetime ("only what is still needed is kept"): each entry counts the reads still to come — one
per consumer forward, plus one per layer that runs inside a checkpointed chunk (it reads again
when recomputed) — and is dropped when the count reaches zero.

Size: an entry holds what its consumers need, sharded like its producer: the top-k of this
rank's own rows and, for the multi-layer loss, the Full layer's detached indexer inputs of those
rows (under sequence parallelism a TP rank's slice: 1/TP of the sequence, never the gathered
rows). :func:`take_state_peak_bytes` reports the peak held by all live states of this process
(the micro-batches in flight under pipelining) since the last call.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from indexcache_train.ops.masking import KeyRange
from indexcache_train.schedule import IndexCacheSchedule

Phase = Literal["forward", "checkpoint", "recompute"]
AttentionMode = Literal["dense", "sparse"]
DistillMode = Literal["multi", "own_layer", "none"]
TopKKey = tuple[str, int]


@dataclass(frozen=True)
class DistillSettings:
    """How indexers are trained in this forward (the recipe stage decides).

    ``weights``: ``"uniform"`` (w_j = 1/(m+1) for a group of m+1 layers) or relative weights by
    position in the group (j = 0 is the Full layer), renormalised over each group's length.
    """

    mode: DistillMode = "none"
    weights: str | tuple[float, ...] = "uniform"
    loss_coeff: float = 1.0
    chunk: int = 128
    #: False for evaluation: terms are measured (``kl_terms``) without building a graph.
    compute_grad: bool = True

    def weight(self, position: int, group_size: int) -> float:
        if self.mode == "own_layer":
            return 1.0 if position == 0 else 0.0
        if self.weights == "uniform":
            return 1.0 / group_size
        ws = list(self.weights)[:group_size]
        if len(ws) < group_size:
            raise ValueError(
                f"distill.weights has {len(ws)} entries but a share group has {group_size} layers; "
                "give one weight per position in the largest group"
            )
        total = sum(ws)
        if total <= 0:
            # e.g. weights [0, 1] on a group of one layer (an MTP Full layer, a trailing Full
            # layer): renormalising would divide by zero and the indexer would get no loss.
            raise ValueError(
                f"distill.weights {tuple(self.weights)} give a share group of {group_size} layer(s) "
                "zero total weight; make the leading weights positive"
            )
        return ws[position] / total


@dataclass
class _Entry:
    #: The top-k of this rank's own rows (``[B, N, K]``).
    topk_BSK: torch.Tensor | None
    #: Detached indexer inputs of the Full layer (own rows) and the module to recompute its
    #: scores with.
    indexer_inputs: tuple[torch.Tensor, ...] | None
    indexer: Any
    pending: int

    @property
    def nbytes(self) -> int:
        tensors = [self.topk_BSK, *(self.indexer_inputs or ())]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class _StateMemory:
    """Bytes held by the entries of every live state in this process, and their peak."""

    def __init__(self) -> None:
        self.states: weakref.WeakSet[DSAForwardState] = weakref.WeakSet()
        self.peak = 0

    def live(self) -> int:
        return sum(st.entry_bytes() for st in list(self.states))

    def update(self) -> None:
        self.peak = max(self.peak, self.live())

    def take_peak(self) -> int:
        peak, self.peak = self.peak, self.live()
        return peak


_MEMORY = _StateMemory()


def take_state_peak_bytes() -> int:
    """Peak bytes of forward-state entries held at once in this process since the last call
    (all micro-batches' states together); the next period starts from what is live now."""
    return _MEMORY.take_peak()


@dataclass(eq=False)  # identity semantics: states are tracked in a WeakSet
class DSAForwardState:
    """Everything one micro-batch forward needs beyond hidden states.

    Args:
        schedule: the IndexCache schedule (roles, sources, consumers).
        position_ids_BS: RoPE positions of the local query rows (per-document for packed data,
            zigzag-ordered under context parallelism).
        key_range: row-wise valid key range (causal / packed / CP); ``None`` = plain causal.
        attention: ``"dense"`` (warm-up) or ``"sparse"`` (top-k).
        distill: indexer distillation settings for this stage.
    """

    schedule: IndexCacheSchedule
    position_ids_BS: torch.Tensor
    key_range: KeyRange | None = None
    attention: AttentionMode = "sparse"
    distill: DistillSettings = field(default_factory=DistillSettings)
    #: Set by the block around each chunk of layers; layers read it.
    phase: Phase = "forward"
    #: Detached per-term losses for logging: (full_layer, served_layer) -> value.
    kl_terms: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    #: When set, every layer stores the top-k it attended here (parity tests).
    captured_topk: dict[int, torch.Tensor] | None = None
    #: Evaluation only: every layer measures the recall of the top-k it uses (a Shared layer:
    #: its source's) against its own attention over all keys (:mod:`indexcache_train.loss.recall`).
    measure_recall: bool = False
    #: layer -> ``[sum of per-row recalls, rows]`` (float64), filled when ``measure_recall``.
    recall: dict[int, torch.Tensor] = field(default_factory=dict)
    #: Evaluation (``measure_recall`` without gradients) measures recall and the per-pair KL on
    #: this many query rows per sequence, a fixed stratified sample (loss/eval_sample.py) that
    #: keeps its cost bounded at long context; 0 = every row (the trainer passes
    #: ``logging.eval_rows``).
    eval_rows: int = 0
    #: Terms computed while the trunk ran without autograd (dense warm-up); see attach_pending.
    pending_losses: list[torch.Tensor] = field(default_factory=list)
    _entries: dict[TopKKey, _Entry] = field(default_factory=dict, repr=False)
    _rope_cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        _MEMORY.states.add(self)

    # ---------------------------------------------------------------- keys
    def key(self, layer: int) -> TopKKey:
        """(segment, layer): segment is ``"trunk"`` or ``"mtp<k>"``."""
        n = self.schedule.num_layers
        return ("trunk", layer) if layer < n else (f"mtp{layer - n}", layer)

    def source_key(self, layer: int) -> TopKKey:
        return self.key(self.schedule.source(layer))

    # ---------------------------------------------------------------- phases
    @contextmanager
    def phase_scope(self, checkpointed: bool) -> Iterator[None]:
        """Mark layers run inside a checkpointed chunk (first pass) or its recompute."""
        previous = self.phase
        # Megatron's CheckpointFunction runs the first pass under no_grad and the recompute
        # with grad enabled, which is how the two are told apart.
        if checkpointed:
            self.phase = "recompute" if torch.is_grad_enabled() else "checkpoint"
        else:
            self.phase = "forward"
        try:
            yield
        finally:
            self.phase = previous

    @property
    def is_recompute(self) -> bool:
        return self.phase == "recompute"

    # ---------------------------------------------------------------- entries
    def has(self, layer: int) -> bool:
        return self.key(layer) in self._entries

    def put(
        self,
        layer: int,
        topk_BSK: torch.Tensor | None,
        indexer_inputs: tuple[torch.Tensor, ...] | None,
        indexer: Any,
    ) -> None:
        """Full layer ``layer`` publishes its top-k (and detached indexer inputs) for its group."""
        pending = len(self.schedule.consumers(layer)) + (1 if self.phase == "checkpoint" else 0)
        if pending:
            self._entries[self.key(layer)] = _Entry(topk_BSK, indexer_inputs, indexer, pending)
            _MEMORY.update()

    def read(self, layer: int) -> _Entry:
        """The entry of ``layer``'s source; counts the read and drops the entry after its last."""
        key = self.source_key(layer)
        entry = self._entries.get(key)
        if entry is None:
            raise RuntimeError(
                f"layer {layer} needs the top-k of its source layer {key[1]} ({key[0]}) but none was "
                "recorded in this forward: the source must run earlier on the same pipeline stage "
                "with the same DSAForwardState (check the pipeline layout and the schedule)"
            )
        entry.pending -= 1
        if self.phase == "checkpoint":
            entry.pending += 1  # this layer reads again when it is recomputed
        if entry.pending <= 0:
            del self._entries[key]
        return entry

    def live_entries(self) -> list[TopKKey]:
        return sorted(self._entries)

    def entry_bytes(self) -> int:
        """Bytes held by this state's live entries."""
        return sum(e.nbytes for e in self._entries.values())

    # ---------------------------------------------------------------- rope cache
    def rotary(
        self, tables: torch.nn.Module, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for this forward's positions, computed once and shared by every layer."""
        key = (id(tables), dtype)
        if key not in self._rope_cache:
            self._rope_cache[key] = tables(self.position_ids_BS, dtype)
        return self._rope_cache[key]

    # ---------------------------------------------------------------- frozen-trunk losses
    def attach_pending(
        self, output: torch.Tensor, input_tensor: torch.Tensor | None
    ) -> torch.Tensor:
        """Attach the terms of a frozen (no-graph) trunk to this pipeline stage's output.

        Backward then delivers the schedule's loss scale to every term (training the indexers)
        and passes a zero gradient to ``input_tensor`` so the previous stage's backward still has
        a well-formed gradient to consume (trunk parameters are frozen: the activation gradient
        carries no information in this stage).
        """
        if not self.pending_losses:
            return output
        # The caller runs the frozen trunk under no_grad: the sum must be taken with grad enabled,
        # or it is a graph-less constant and the indexers silently receive no gradient.
        with torch.enable_grad():
            total = torch.stack([t.reshape(()) for t in self.pending_losses]).sum()
            self.pending_losses.clear()
            return _AttachFrozen.apply(
                output, input_tensor if input_tensor is not None else total, total
            )

    # ---------------------------------------------------------------- logging
    def record_kl(self, full_layer: int, served_layer: int, value: torch.Tensor) -> None:
        if self.phase != "checkpoint":
            self.kl_terms[(full_layer, served_layer)] = value.detach()

    def record_recall(self, layer: int, hits_and_rows: torch.Tensor) -> None:
        if self.phase != "checkpoint":
            self.recall[layer] = hits_and_rows.detach()


class _AttachFrozen(torch.autograd.Function):
    """``output`` unchanged; backward: scaled gradient to the loss, zeros to the stage input."""

    @staticmethod
    def forward(ctx, output, stage_input, loss):  # type: ignore[override]
        from indexcache_train.loss.autoscaler import IndexCacheLossAutoScaler

        ctx.input_meta = (stage_input.shape, stage_input.dtype, stage_input.device)
        ctx.scaler = IndexCacheLossAutoScaler
        ctx.loss_meta = (loss.dtype, loss.device)
        return output.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        scale = ctx.scaler.main_loss_backward_scale
        dtype, device = ctx.loss_meta
        g = torch.ones((), dtype=dtype, device=device)
        if scale is not None:
            g = g * scale.to(device=device, dtype=dtype).reshape(())
        shape, in_dtype, in_device = ctx.input_meta
        return None, torch.zeros(shape, dtype=in_dtype, device=in_device), g
