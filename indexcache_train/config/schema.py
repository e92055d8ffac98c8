"""Typed schema behind every YAML under ``configs/`` (Hydra structured configs).

One dataclass per config group; a key that is not a field here (a typo) fails at compose time,
before any process group or model exists. Cross-field checks live in
:mod:`indexcache_train.config.validate`. Pure Python: no torch / Megatron import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from indexcache_train.data.config import DataConfig


@dataclass
class ModelSection:
    """Which model to build."""

    preset: str | None = "glm5_toy"
    """A named config from ``indexcache_train.model.presets`` (glm5, glm5.2, deepseek-v3.2,
    glm5_toy, dsv32_toy, bench_glm5); ignored when ``hf_path`` is set."""
    hf_path: str | None = None
    """An HF checkpoint directory (or its ``config.json``): the model config is read from it."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """HF config fields replaced after loading (e.g. sizes of a scaled-down model)."""
    num_mtp_layers: int | None = None
    """MTP depth; None: ``num_nextn_predict_layers`` of the HF config."""
    seq_length: int = 256
    """Tokens per training sample."""
    kernel_backend: str = "auto"
    """``auto`` (GPU kernels on CUDA, PyTorch reference on CPU), ``torch`` or ``triton``."""
    lm_loss_chunk: int = 0
    """Tokens per chunk of the LM head + cross-entropy (recomputed per chunk in the backward), so
    the fp32 logits of a whole sequence never exist at once; 0: Megatron's unchunked path."""
    moe_grouped_gemm: str = "false"
    """Routed experts as one grouped GEMM per projection (``model/grouped_experts.py``, same
    checkpoints) instead of Megatron's per-expert loop: ``true``, ``false`` or ``auto`` (grouped
    on GPUs that run ``torch._grouped_mm`` in bf16, i.e. sm_90+)."""


@dataclass
class IndexCacheSection:
    """The IndexCache schedule (upstream key names). All None: the HF config's own schedule."""

    index_topk_freq: int | None = None
    index_skip_topk_offset: int | None = None
    """Required with ``index_topk_freq`` > 1 (ecosystems disagree on its default)."""
    index_topk_pattern: str | None = None
    indexer_types: list[str] | None = None
    index_share_for_mtp_iteration: bool | None = None

    def any_set(self) -> bool:
        return any(
            v is not None
            for v in (self.index_topk_freq, self.index_topk_pattern, self.indexer_types)
        )


@dataclass
class DistillSection:
    """How Full-layer indexers are trained."""

    mode: str = "multi"
    """``multi`` (training-aware IndexCache: each Full indexer distils the attention of every
    layer it serves), ``own_layer`` (Megatron's DSA loss: own layer only; the paper's "w/o
    cross-layer loss" ablation) or ``none`` (training-free reuse)."""
    weights: list[float] | None = None
    """Relative weight per position in a share group (Full layer first); None: uniform 1/(m+1)."""
    loss_coeff: float = 1.0
    """Multiplies the distillation loss (per query row, like the LM loss)."""
    chunk: int = 128
    """Query rows per chunk of the PyTorch loss path (memory O(chunk * seq) dense)."""


@dataclass
class StageSection:
    """One recipe stage."""

    name: str = "sparse"
    steps: int = 100
    lr: float = 3e-4
    """Peak learning rate of the stage (warmup + cosine to ``min_lr`` within the stage)."""
    min_lr: float = 0.0
    warmup_steps: int = 0
    attention: str = "sparse"
    """``dense`` (warm-up: main attention over all keys) or ``sparse`` (top-k)."""
    trainable: str = "all"
    """``indexers`` (only Full-layer indexers; the trunk is frozen and runs without autograd)
    or ``all`` (trunk by the LM loss, indexers by the distillation loss)."""
    indexer_lr: float | None = None
    """Peak lr of the indexer parameters when it differs from ``lr`` (``trainable=all``)."""


@dataclass
class RecipeSection:
    stages: list[StageSection] = field(default_factory=lambda: [StageSection()])


@dataclass
class ParallelSection:
    """Megatron-Core parallelism; world size = tp * pp * cp * dp (EP splits the DP*CP*TP ranks)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    pipeline_layout: str = "auto"
    """``auto`` (balanced, split only at share-group boundaries), ``even`` (Megatron's split,
    checked) or an explicit ``pipeline_model_parallel_layout`` string (checked)."""
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    moe_token_dispatcher_type: str = "alltoall"
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    """Keep False with multi-layer distillation: a Full indexer receives gradient from several
    layers' backward passes, which Megatron's per-bucket readiness tracking does not expect."""


@dataclass
class OptimSection:
    optimizer: str = "adam"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    micro_batch_size: int = 1
    global_batch_size: int = 8
    bf16: bool = False
    moe_router_bias_update_rate: float = 1e-3
    moe_aux_loss_coeff: float = 0.0
    mtp_loss_scaling_factor: float = 0.1
    on_nonfinite: str = "stop"
    """A step whose LM loss, distillation terms or gradients are NaN/inf: ``stop`` (raise before
    the update, so the weights and the last checkpoint stay clean) or ``skip`` (drop that
    update, log ``optim/skipped``, go on with the next batch)."""
    max_consecutive_skips: int = 5
    """With ``on_nonfinite=skip``: stop after this many non-finite steps in a row."""


@dataclass
class CheckpointSection:
    save_interval: int = 0
    """Save every N steps (0: only at stage ends, at the end and on SIGTERM)."""
    keep_last: int = 2
    """Retention: keep the newest N step checkpoints (stage-end checkpoints are kept)."""
    dir: str | None = None
    """None: ``<run_dir>/checkpoints``."""
    auto_resume: bool = True
    """Resume from the newest complete checkpoint in ``dir`` if there is one."""
    load_pretrained: str | None = None
    """A Megatron checkpoint (e.g. from ``checkpoint_tools import``) to initialise the model from
    when not resuming; model weights only."""
    exit_after_steps: int | None = None
    """Stop (after saving) once this many steps have run in this process (tests, time slicing)."""
    allow_config_change: bool = False
    """Resume even though the config differs from the checkpoint's in a way that changes what
    the run trains (model, schedule, recipe, optimizer, data, seed); the differences are logged
    and the new config is kept next to the old one. False: such a resume is refused."""
    optimizer_format: str = "dp_reshardable"
    """How the distributed optimizer's state is saved: ``dp_reshardable`` (every rank writes its
    shard, no communication; resumes at another data-parallel size only) or
    ``fully_reshardable`` (gathered over DP per model-parallel shard, written per parameter;
    resumes under any TP / PP / EP / CP / DP layout, at the cost of that gather's memory)."""


@dataclass
class LoggingSection:
    log_interval: int = 1
    eval_interval: int = 0
    """Held-out evaluation every N steps (0: only at the end)."""
    eval_iters: int = 2
    eval_rows: int = 1024
    """Query rows per sequence on which evaluation measures recall and the per-pair KL: a fixed
    stratified sample (``loss/eval_sample.py``; its error against every row is in
    docs/design.md), so an evaluation at 128K stays bounded. 0: every row (exact, O(S^2))."""
    wandb_mode: str = "disabled"
    """``disabled`` (null logger), ``offline`` or ``online`` (needs the ``wandb`` package:
    ``EXTRAS=test,wandb make setup``). ``metrics.jsonl`` / ``eval.jsonl`` are written always."""
    wandb_project: str = "indexcache-train"
    tensorboard: bool = False
    """Also write TensorBoard event files to ``<run_dir>/tensorboard`` (needs ``tensorboard``)."""
    peak_tflops: float | None = None
    """Per-GPU peak for MFU; None: looked up from the device name (H100/H200 bf16 dense)."""


@dataclass
class RunSection:
    name: str = "toy"
    """Experiment name; the run directory is ``<root>/<name>-<job id>``."""
    root: str = "runs"
    seed: int = 1234
    dry_run: bool = False
    """Compose, validate, build one pipeline stage on the meta device and print sizes; no training."""
    world_size: int | None = None
    """World size for ``dry_run`` (None: the launcher's)."""
    deterministic: bool = False


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    indexcache: IndexCacheSection = field(default_factory=IndexCacheSection)
    distill: DistillSection = field(default_factory=DistillSection)
    recipe: RecipeSection = field(default_factory=RecipeSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    run: RunSection = field(default_factory=RunSection)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.recipe.stages)
