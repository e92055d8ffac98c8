"""Cross-field validation of a composed config, before any process group or model exists.

Every check raises :class:`ConfigError` naming the fields and the fix. ``validate`` needs no
torch; the model config and pipeline layout it resolves are returned for the trainer to use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from indexcache_train.config.schema import TrainConfig

ATTENTION = ("dense", "sparse")
TRAINABLE = ("indexers", "all")
DISTILL_MODES = ("multi", "own_layer", "none")
GROUPED_GEMM = ("auto", "true", "false")
WANDB_MODES = ("disabled", "offline", "online")
#: Megatron distributed-optimizer checkpoint formats (training/checkpointing.py).
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")


class ConfigError(ValueError):
    """An inconsistent configuration (message: what, where, how to fix)."""


@dataclass(frozen=True)
class Resolved:
    """What validation derived: the model description and the pipeline layout string."""

    model: Any  # indexcache_train.model.config.ModelConfig
    pipeline_layout: str | None
    data_parallel_size: int
    num_microbatches: int


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def check_parallel(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    p = cfg.parallel
    tp, pp, cp, ep = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.context_parallel_size,
        p.expert_model_parallel_size,
    )
    for name, v in (
        ("tensor_model_parallel_size", tp),
        ("pipeline_model_parallel_size", pp),
        ("context_parallel_size", cp),
        ("expert_model_parallel_size", ep),
    ):
        _require(v >= 1, f"parallel.{name}={v} must be >= 1")
    _require(
        world_size % (tp * pp * cp) == 0,
        f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}; change the "
        "parallel sizes or the number of processes",
    )
    dp = world_size // (tp * pp * cp)
    _require(
        (dp * cp) % ep == 0,
        f"parallel.expert_model_parallel_size={ep} must divide dp*cp = {dp}*{cp} "
        f"(world {world_size} / (tp {tp} * pp {pp}))",
    )
    if tp > 1:
        _require(
            p.sequence_parallel,
            "tensor_model_parallel_size > 1 requires parallel.sequence_parallel=true (MoE "
            "with TP needs it, and it keeps replicated-norm gradients correct)",
        )
    o = cfg.optim
    for name in ("micro_batch_size", "global_batch_size"):
        _require(getattr(o, name) >= 1, f"optim.{name}={getattr(o, name)} must be >= 1")
    _require(
        o.global_batch_size % (o.micro_batch_size * dp) == 0,
        f"optim.global_batch_size={o.global_batch_size} must be a multiple of "
        f"micro_batch_size*dp = {o.micro_batch_size}*{dp}",
    )
    return dp, o.global_batch_size // (o.micro_batch_size * dp)


def check_recipe(cfg: TrainConfig) -> None:
    _require(len(cfg.recipe.stages) > 0, "recipe.stages is empty; give at least one stage")
    names = [s.name for s in cfg.recipe.stages]
    _require(len(set(names)) == len(names), f"recipe.stages names must be unique, got {names}")
    for i, s in enumerate(cfg.recipe.stages):
        where = f"recipe.stages[{i}] ({s.name})"
        _require(s.steps > 0, f"{where}.steps={s.steps} must be > 0")
        _require(
            s.attention in ATTENTION, f"{where}.attention={s.attention!r}: use one of {ATTENTION}"
        )
        _require(
            s.trainable in TRAINABLE, f"{where}.trainable={s.trainable!r}: use one of {TRAINABLE}"
        )
        _require(s.lr >= 0 and s.min_lr >= 0, f"{where}: lr and min_lr must be >= 0")
        _require(0 <= s.warmup_steps <= s.steps, f"{where}.warmup_steps must be within [0, steps]")
        if s.trainable == "indexers":
            _require(
                cfg.distill.mode != "none",
                f"{where} trains only indexers but distill.mode=none gives them no loss; "
                "use distill=multi or distill=own_layer",
            )
    _require(
        cfg.distill.mode in DISTILL_MODES,
        f"distill.mode={cfg.distill.mode!r}: use one of {DISTILL_MODES}",
    )
    if cfg.distill.weights is not None:
        _require(
            all(w >= 0 for w in cfg.distill.weights) and sum(cfg.distill.weights) > 0,
            "distill.weights must be non-negative with a positive sum",
        )
    _require(cfg.distill.chunk > 0, "distill.chunk must be > 0")
    _require(
        cfg.optim.on_nonfinite in ("stop", "skip"),
        f"optim.on_nonfinite={cfg.optim.on_nonfinite!r}: use stop or skip",
    )
    _require(
        cfg.optim.max_consecutive_skips >= 1,
        f"optim.max_consecutive_skips={cfg.optim.max_consecutive_skips} must be >= 1",
    )


def resolve_model(cfg: TrainConfig) -> Any:
    """``ModelConfig`` from the preset / HF path, overrides and the IndexCache section."""
    import json
    from pathlib import Path

    from indexcache_train.model.config import ModelConfig
    from indexcache_train.model.presets import preset_hf_config
    from indexcache_train.schedule import IndexCacheSchedule, ScheduleError

    m = cfg.model
    if m.hf_path:
        path = Path(m.hf_path)
        path = path / "config.json" if path.is_dir() else path
        _require(path.is_file(), f"model.hf_path={m.hf_path!r}: no config.json there")
        hf = json.loads(path.read_text())
    else:
        _require(m.preset is not None, "set model.preset or model.hf_path")
        try:
            hf = preset_hf_config(m.preset)  # type: ignore[arg-type]
        except KeyError as e:
            raise ConfigError(str(e)) from None
    overrides = dict(m.overrides)
    if {"num_hidden_layers", "first_k_dense_replace"} & set(overrides):
        # Lists transformers derives from the layer count would be stale; they are recomputed.
        for derived in ("mlp_layer_types", "layer_types", "indexer_types"):
            hf.pop(derived, None)
    hf = {**hf, **overrides}
    mtp = (
        m.num_mtp_layers
        if m.num_mtp_layers is not None
        else int(hf.get("num_nextn_predict_layers") or 0)
    )
    ic = cfg.indexcache
    schedule = None
    try:
        if ic.any_set():
            schedule = IndexCacheSchedule.from_keys(
                int(hf["num_hidden_layers"]),
                mtp,
                index_topk_freq=ic.index_topk_freq,
                index_skip_topk_offset=ic.index_skip_topk_offset,
                index_topk_pattern=ic.index_topk_pattern,
                indexer_types=ic.indexer_types,
                index_share_for_mtp_iteration=bool(ic.index_share_for_mtp_iteration),
            )
        model = ModelConfig.from_hf_config(hf, schedule=schedule, num_mtp_layers=mtp)
    except (ScheduleError, ValueError) as e:
        raise ConfigError(f"model/indexcache config: {e}") from None
    _require(
        m.lm_loss_chunk >= 0,
        f"model.lm_loss_chunk={m.lm_loss_chunk}: use 0 (whole-sequence logits) or a positive "
        "number of tokens per chunk",
    )
    _require(
        m.moe_grouped_gemm.lower() in GROUPED_GEMM,
        f"model.moe_grouped_gemm={m.moe_grouped_gemm!r}: use one of {GROUPED_GEMM}",
    )
    _check_kernel_backend(cfg, model)
    _require(m.seq_length > 1, "model.seq_length must be > 1")
    cp = cfg.parallel.context_parallel_size
    _require(
        m.seq_length % (2 * cp) == 0 or cp == 1,
        f"model.seq_length={m.seq_length} must be divisible by 2*context_parallel_size={2 * cp}",
    )
    _check_lengths(cfg, model)
    _check_sharing(cfg, model)
    return model


def _check_lengths(cfg: TrainConfig, model: Any) -> None:
    """Lengths the model accepts but that would silently mean something else."""
    s = cfg.model.seq_length
    _require(
        s <= model.max_position_embeddings,
        f"model.seq_length={s} exceeds the model's max_position_embeddings="
        f"{model.max_position_embeddings} (positions past it were never trained and RoPE "
        "scaling is set for that length); lower model.seq_length or set "
        "model.overrides.max_position_embeddings (with a RoPE scaling that covers it)",
    )
    sparse = [st.name for st in cfg.recipe.stages if st.attention == "sparse"]
    _require(
        not sparse or model.index_topk < s,
        f"index_topk={model.index_topk} >= model.seq_length={s}: every query keeps all its keys, "
        f"so the sparse stage(s) {sparse} would train dense attention and IndexCache would "
        f"change nothing; use model.seq_length > {model.index_topk} or lower "
        "model.overrides.index_topk",
    )
    try:
        cfg.data.check_repeat_fits(s)
    except ValueError as e:  # DataConfigError; as a ConfigError like every check here
        raise ConfigError(str(e)) from None


def _check_sharing(cfg: TrainConfig, model: Any) -> None:
    """Layers ``0..offset-1`` are always Full; an offset at or past the depth shares nothing."""
    ic, n = cfg.indexcache, model.num_hidden_layers
    offset = ic.index_skip_topk_offset
    if offset is not None and (ic.index_topk_freq or 1) > 1:
        _require(
            offset < n,
            f"indexcache.index_skip_topk_offset={offset} is past the model's {n} layers: layers "
            "0..offset-1 are always Full, so every layer would be Full and nothing shared; "
            f"use an offset < {n} (GLM-5.2 / HF / vLLM / SGLang: 2, Megatron: 1)",
        )


def _check_kernel_backend(cfg: TrainConfig, model: Any) -> None:
    """A named backend (``triton``) insists on its kernels: refuse a model it cannot run now,
    by the rules its hooks apply at run time, rather than at the first forward."""
    from indexcache_train.ops import backends

    m = cfg.model
    _require(
        m.kernel_backend in backends.MODES,
        f"model.kernel_backend={m.kernel_backend!r}: use one of {backends.MODES}",
    )
    facts = backends.ModelFacts(
        index_head_dim=model.index_head_dim,
        kv_lora_rank=model.kv_lora_rank,
        qk_rope_head_dim=model.qk_rope_head_dim,
        qk_head_dim=model.qk_head_dim,
        v_head_dim=model.v_head_dim,
        attention=frozenset(st.attention for st in cfg.recipe.stages),
        dtype="bfloat16" if cfg.optim.bf16 else "float32",
    )
    bad = backends.model_declines(m.kernel_backend, facts)
    _require(
        not bad,
        f"model.kernel_backend={m.kernel_backend} but its kernels cannot run this model: "
        + "; ".join(bad)
        + ". Use model.kernel_backend=auto (PyTorch where no kernel applies), or a bf16 "
        "model (optim.bf16=true) of dims the kernels take (every real GLM-5 / DeepSeek-V3.2 "
        "size does, at any tensor-parallel size).",
    )


def check_logging(cfg: TrainConfig) -> None:
    """Intervals that would divide by zero, an unknown checkpoint format, and optional metric
    sinks that are not installed (found here, not after the model is built)."""
    import importlib.util

    lg, ck = cfg.logging, cfg.checkpoint
    _require(lg.log_interval >= 1, f"logging.log_interval={lg.log_interval} must be >= 1")
    _require(
        lg.eval_interval >= 0,
        f"logging.eval_interval={lg.eval_interval} must be >= 0 (0: evaluate at the end only)",
    )
    _require(lg.eval_iters >= 1, f"logging.eval_iters={lg.eval_iters} must be >= 1")
    _require(
        lg.eval_rows >= 0,
        f"logging.eval_rows={lg.eval_rows} must be >= 0 (0: every row; N: a sample of N rows)",
    )
    _require(
        ck.save_interval >= 0,
        f"checkpoint.save_interval={ck.save_interval} must be >= 0 (0: stage ends and end only)",
    )
    _require(
        ck.exit_after_steps is None or ck.exit_after_steps >= 1,
        f"checkpoint.exit_after_steps={ck.exit_after_steps} must be >= 1 or null",
    )
    _require(
        ck.optimizer_format in OPTIMIZER_FORMATS,
        f"checkpoint.optimizer_format={ck.optimizer_format!r}: use one of {OPTIMIZER_FORMATS}",
    )
    _require(
        lg.wandb_mode in WANDB_MODES,
        f"logging.wandb_mode={lg.wandb_mode!r}: use one of {WANDB_MODES}",
    )
    if lg.wandb_mode != "disabled":
        _require(
            importlib.util.find_spec("wandb") is not None,
            f"logging.wandb_mode={lg.wandb_mode} needs the wandb package, which is not "
            "installed: `EXTRAS=test,wandb make setup` (or pip install wandb), or set "
            "logging.wandb_mode=disabled (metrics.jsonl is written either way)",
        )
    if lg.tensorboard:
        _require(
            importlib.util.find_spec("tensorboard") is not None,
            "logging.tensorboard=true needs the tensorboard package, which is not installed: "
            "pip install tensorboard, or set logging.tensorboard=false (metrics.jsonl is "
            "written either way)",
        )


def check_vocab(cfg: TrainConfig, model_vocab: int) -> None:
    from indexcache_train.data import load_tokenizer

    tok = load_tokenizer(cfg.data.tokenizer_path())
    _require(
        tok.vocab_size <= model_vocab,
        f"data tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {model_vocab}; "
        f"set model.overrides.vocab_size >= {tok.vocab_size} (e.g. a multiple of 64) or use "
        "the model's own tokenizer",
    )


def validate(cfg: TrainConfig, world_size: int) -> Resolved:
    """Every cross-field check; returns what the trainer builds from.

    Raises:
        ConfigError: The first inconsistency found (message: fields and fix).
    """
    check_recipe(cfg)
    check_logging(cfg)
    dp, num_micro = check_parallel(cfg, world_size)
    model = resolve_model(cfg)
    check_vocab(cfg, model.vocab_size)
    from indexcache_train.parallel import LayerCosts, PipelineLayoutError
    from indexcache_train.parallel.pipeline_layout import resolve_pipeline_layout

    p = cfg.parallel
    try:
        layout = resolve_pipeline_layout(
            model.schedule,
            p.pipeline_model_parallel_size,
            p.virtual_pipeline_model_parallel_size,
            layout=p.pipeline_layout,
            first=p.num_layers_in_first_pipeline_stage,
            last=p.num_layers_in_last_pipeline_stage,
            costs=LayerCosts(first_k_dense_replace=model.first_k_dense_replace),
        )
    except PipelineLayoutError as e:
        raise ConfigError(f"parallel.pipeline_layout: {e}") from None
    return Resolved(model, layout, dp, num_micro)
