"""``overlap``: cross-layer top-k overlap and attention-mass heatmaps on calibration data.

    python -m indexcache_train.tools overlap --hf HF_DIR --data default --batches 8 --seq 4096 --out DIR
    python -m indexcache_train.tools overlap --model glm5_toy --seed 0 --data random \\
        --batches 2 --seq 64 --out DIR

Runs the model with **every trunk layer Full** (each computes its own indexer top-k and attends
it, whatever schedule the checkpoint was saved with; MTP layers are not analysed) and writes
into ``--out`` (each file written to a temporary name, then renamed):

* ``overlap.csv`` / ``overlap.png``: ``O[i, j]`` = mean over rows of ``|T_i ∩ T_j| / k``;
* ``mass.csv`` / ``mass.png``: ``M[i, j]`` = mean over rows of layer i's attention probability
  (over all causal keys, head-mean) that falls on layer j's top-k ``T_j``;

and prints a per-layer table. Metric definitions: :mod:`indexcache_train.tools.overlap`. Rows
with k or fewer valid keys are excluded (the selection then holds every key: overlap and mass
are 1 by construction).

A checkpoint whose Shared layers carry no indexer weights (an IndexCache checkpoint) is
refused: a Shared layer has no top-k of its own to compare. Run the tool on the all-Full
checkpoint the schedule was derived from. ``--model PRESET`` builds a preset with random weights
(``--seed``): for toys and smoke tests, not for conclusions.

Two forward passes per batch: the first records every layer's top-k, the second computes each
layer's attention over all keys one query chunk at a time (no ``[S, S]`` tensor) against every
layer's top-k (a layer's mass row needs the top-k of *later* layers too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from indexcache_train.tools.model_io import write_atomic
from indexcache_train.tools.plot import (
    PlotsUnavailableError,
    heatmap_figure,
    require_matplotlib,
    to_png,
)

_OUTPUTS = ("overlap.csv", "mass.csv", "overlap.png", "mass.png")


class OverlapError(RuntimeError):
    """A refused input; the message says why and what to do."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``overlap`` verb."""
    p = subparsers.add_parser(
        "overlap",
        help="cross-layer top-k overlap and attention-mass heatmaps (CSV + PNG)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="HF checkpoint directory whose every layer has an indexer")
    src.add_argument("--model", help="model preset with random weights (e.g. glm5_toy)")
    p.add_argument("--seed", type=int, default=0, help="weights (--model) and --data random")
    p.add_argument(
        "--data",
        default="default",
        help="Megatron indexed dataset prefix (PREFIX.bin/.idx), 'default' (the bundled "
        "validation corpus) or 'random' (uniform token ids; toys)",
    )
    p.add_argument("--batches", type=int, required=True, help="calibration batches")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per batch")
    p.add_argument("--seq", type=int, required=True, help="tokens per sequence")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--chunk", type=int, default=128, help="query rows per attention chunk")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compute, write and print; 2 (with the reason on stderr) for a refused input."""
    try:
        require_matplotlib()  # before any compute
        out = Path(args.out)
        existing = [n for n in _OUTPUTS if (out / n).exists()]
        if existing and not args.overwrite:
            raise OverlapError(f"{out} already holds {existing}; pass --overwrite or another --out")
        if args.batches < 1 or args.batch_size < 1 or args.seq < 2:
            raise OverlapError("--batches and --batch-size must be >= 1 and --seq >= 2")
        stats, label = compute(args)
    except (OverlapError, PlotsUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    overlap, mass = stats.overlap(), stats.mass()
    write_outputs(out, overlap.tolist(), mass.tolist())
    print(f"model: {label}; {args.batches} x {args.batch_size} x {args.seq} tokens ({args.data})")
    print(format_table(overlap.tolist(), mass.tolist()))
    print(f"wrote {', '.join(str(out / n) for n in _OUTPUTS)}")
    return 0


# ---------------------------------------------------------------------- model
def all_full_trunk_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The config with every trunk layer Full and no MTP layer (explicit ``indexer_types``)."""
    from indexcache_train.schedule import IndexCacheSchedule
    from indexcache_train.schedule.hf_keys import SCHEDULE_KEYS

    n = int(hf_config["num_hidden_layers"])
    out = {k: v for k, v in hf_config.items() if k not in SCHEDULE_KEYS}
    sched = IndexCacheSchedule.from_indexer_types(["full"] * n, n)
    out.update(sched.to_hf_config(), num_nextn_predict_layers=0)
    return out


def missing_indexers(names: list[str], num_layers: int) -> list[int]:
    """Trunk layers with no ``model.layers.N.self_attn.indexer.*`` tensor."""
    from checkpoint_tools.layout import indexer_prefix

    have = {i for i in range(num_layers) if any(n.startswith(indexer_prefix(i)) for n in names)}
    return [i for i in range(num_layers) if i not in have]


def build(args: argparse.Namespace, dtype: Any):
    """``(ModelConfig, model, label)``: all-Full trunk, weights from ``--hf`` or random."""
    import torch

    from checkpoint_tools.megatron_runtime import ParallelLayout, build_stage, init_parallel
    from indexcache_train.model.config import ModelConfig
    from indexcache_train.model.factory import ParallelSettings, build_model, transformer_config
    from indexcache_train.model.presets import preset_hf_config

    init_parallel(ParallelLayout(), seed=args.seed)
    if args.model is not None:
        try:
            hf = preset_hf_config(args.model)
        except KeyError as err:
            raise OverlapError(str(err.args[0])) from None
        cfg = ModelConfig.from_hf_config(all_full_trunk_config(hf))
        par = ParallelSettings(
            moe_token_dispatcher_type="allgather",
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
        )
        torch.manual_seed(args.seed)
        model = build_model(cfg, transformer_config(cfg, par))
        return cfg, model, f"{args.model} (random weights, seed {args.seed})"
    from checkpoint_tools.errors import CheckpointError
    from checkpoint_tools.hf_io import CONFIG_NAME, HFCheckpoint
    from checkpoint_tools.megatron_dir import resolve_model_config
    from checkpoint_tools.progress import NullProgress
    from checkpoint_tools.stage_loader import StageSharding, fill_stage
    from indexcache_train.schedule import IndexCacheSchedule

    try:
        ckpt = HFCheckpoint(args.hf)
        n = int(ckpt.config["num_hidden_layers"])
        missing = missing_indexers(ckpt.names, n)
        if missing:
            raise OverlapError(
                f"{args.hf}: trunk layers {missing} have no indexer weights (Shared layers of an "
                "IndexCache schedule, or a dense-MLA model). `overlap` compares every layer's OWN "
                "indexer top-k, so every layer needs one. Fix: run it on the all-Full "
                "checkpoint the schedule came from (an indexer copied in by convert-schedule is "
                "not the layer's own)."
            )
        schedule = IndexCacheSchedule.from_indexer_types(["full"] * n, n)
        file = str(ckpt.path / CONFIG_NAME)
        _, cfg, _ = resolve_model_config(all_full_trunk_config(ckpt.config), schedule, file)
        model = build_stage(cfg, ParallelLayout(), dtype)
        fill_stage(
            model,
            cfg,
            ckpt,
            StageSharding.from_parallel_state(cfg.n_routed_experts),
            NullProgress(),
        )
    except CheckpointError as err:
        raise OverlapError(str(err)) from None
    return cfg, model, f"{args.hf} (all {n} trunk layers Full)"


def absorbed_qkv(attn: Any, hidden_SBH: Any, state: Any):
    """``(q_abs_BSHD, kv_BTD)`` of an attention module for its input, as its sparse path builds
    them (TP = CP = 1): absorbed query ``[q_nope W_uk | q_pe]`` and latent key ``[c_kv | k_pe]``.

    Mirrors ``DSASelfAttention.forward`` / ``_sparse``; the unit test checks that attending
    these over the layer's top-k reproduces the layer's output, so a drift there fails loudly.
    """
    import torch

    from indexcache_train.model.rope import apply_rope

    d = attn.dims
    q_lat = attn.q_layernorm(attn.linear_q_down_proj(hidden_SBH)[0])
    c_kv, k_pe = attn.linear_kv_down_proj(hidden_SBH)[0].split(
        [d.kv_lora_rank, d.qk_rope_head_dim], dim=-1
    )
    c_kv = attn.kv_layernorm(c_kv)
    q = attn.linear_q_up_proj(q_lat)[0]
    S, B = q.shape[:2]
    q_BSHD = q.view(S, B, attn.heads, d.qk_head_dim).transpose(0, 1)
    cos, sin = state.rotary(attn.rotary, q.dtype)
    q_pe = apply_rope(q_BSHD[..., d.qk_nope_head_dim :], cos, sin, d.rope_interleave)
    k_pe_BTR = apply_rope(k_pe.transpose(0, 1), cos, sin, d.rope_interleave)
    w_uk_HNR, _ = attn._kv_up_weights()
    q_nope = torch.einsum("bshn,hnr->bshr", q_BSHD[..., : d.qk_nope_head_dim], w_uk_HNR)
    return torch.cat([q_nope, q_pe], -1), torch.cat([c_kv.transpose(0, 1), k_pe_BTR], -1)


def attention_modules(model: Any) -> list[Any]:
    """The trunk's ``DSASelfAttention`` modules, in layer order."""
    return [layer.self_attention for layer in model.decoder.layers]


# ---------------------------------------------------------------------- data
def calibration_batches(args: argparse.Namespace, vocab_size: int) -> list[Any]:
    """``--batches`` token tensors ``[batch_size, seq]`` (int64)."""
    import torch

    shape = (args.batches, args.batch_size, args.seq)
    if args.data == "random":
        gen = torch.Generator().manual_seed(args.seed)
        return list(torch.randint(0, vocab_size, shape, generator=gen))
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from indexcache_train.data.config import BUNDLED_CORPUS_DIR

    prefix = str(BUNDLED_CORPUS_DIR / "val") if args.data == "default" else args.data
    if not (Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()):
        raise OverlapError(f"--data {args.data!r}: no {prefix}.bin/.idx (or use 'random')")
    need = args.batches * args.batch_size * args.seq
    ds, parts, have = IndexedDataset(prefix), [], 0
    for doc in range(len(ds)):  # documents in order, concatenated (the .bin holds their EODs)
        if have >= need:
            break
        parts.append(np.asarray(ds[doc], dtype=np.int64)[: need - have])
        have += parts[-1].size
    if have < need:
        raise OverlapError(f"{prefix} holds {have} tokens; {need} are needed")
    tokens = torch.from_numpy(np.concatenate(parts)).view(shape)
    if int(tokens.max()) >= vocab_size:
        raise OverlapError(
            f"{prefix} has token id {int(tokens.max())} >= the model's vocab_size {vocab_size}: "
            "tokenised for another model. Use data tokenised with this model's tokenizer."
        )
    return list(tokens)


# ---------------------------------------------------------------------- metrics
def compute(args: argparse.Namespace):
    """``(OverlapStats, label)`` over the calibration batches."""
    import torch

    from indexcache_train.tools.overlap import OverlapStats

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    cfg, model, label = build(args, dtype)
    if args.seq <= cfg.index_topk:
        raise OverlapError(
            f"--seq {args.seq} <= index_topk {cfg.index_topk}: every row would select all its keys "
            "(overlap and mass 1 by construction); use a longer --seq"
        )
    model = model.to(device).eval()
    stats = OverlapStats.zeros(cfg.num_layers)
    for tokens in calibration_batches(args, cfg.vocab_size):
        batch_stats(model, cfg, tokens.to(device), stats, args.chunk)
    return stats, label


def batch_stats(model: Any, cfg: Any, tokens_BS: Any, stats: Any, chunk: int = 128) -> None:
    """Add one batch to ``stats``: pass 1 records every layer's top-k, pass 2 the masses."""
    import torch

    from indexcache_train.loss.recall import head_sum_probs_all_keys
    from indexcache_train.model.forward_state import DSAForwardState
    from indexcache_train.ops.masking import KeyRange

    B, S = tokens_BS.shape
    positions = torch.arange(S, device=tokens_BS.device).expand(B, S)
    key_range = KeyRange.causal(B, S, tokens_BS.device)
    with torch.no_grad():
        first = DSAForwardState(cfg.schedule, positions, attention="sparse", captured_topk={})
        model(tokens_BS, positions, None, dsa_state=first)
        topk_LBSK = torch.stack([first.captured_topk[i] for i in range(cfg.num_layers)])
        # Rows with <= k valid keys select them all (overlap and mass 1 by construction).
        rows_BS = key_range.num_valid() > topk_LBSK.shape[-1]
        stats.add_overlap(topk_LBSK, rows_BS)

        def mass_row(attn: Any, args: tuple, kwargs: dict) -> None:
            q_abs_BSHD, kv_BTD = absorbed_qkv(attn, args[0], kwargs["dsa_state"])
            T = kv_BTD.shape[1]

            def probs(s0: int, s1: int) -> torch.Tensor:
                valid_BCT = key_range.rows(s0, s1).dense_mask(T)
                return head_sum_probs_all_keys(
                    q_abs_BSHD[:, s0:s1], kv_BTD, valid_BCT, attn.dims.softmax_scale
                )

            stats.add_mass(probs, attn.layer_index, topk_LBSK, rows_BS, chunk)

        hooks = [
            a.register_forward_pre_hook(mass_row, with_kwargs=True)
            for a in attention_modules(model)
        ]
        try:
            second = DSAForwardState(cfg.schedule, positions, attention="sparse")
            model(tokens_BS, positions, None, dsa_state=second)
        finally:
            for h in hooks:
                h.remove()


# ---------------------------------------------------------------------- output
def write_outputs(out: Path, overlap: list[list[float]], mass: list[list[float]]) -> None:
    """``overlap.csv``, ``mass.csv`` and their heatmaps (rows i, columns j; scale 0..1)."""
    from indexcache_train.tools.overlap import matrix_csv

    write_atomic(out / "overlap.csv", matrix_csv(overlap, "layer_i/layer_j").encode())
    write_atomic(out / "mass.csv", matrix_csv(mass, "attention_i/topk_j").encode())
    figures = {
        "overlap.png": heatmap_figure(
            overlap,
            title="top-k overlap |T_i ∩ T_j| / k",
            xlabel="layer j",
            ylabel="layer i",
            colorbar_label="overlap",
        ),
        "mass.png": heatmap_figure(
            mass,
            title="attention mass of layer i inside layer j's top-k",
            xlabel="layer j (top-k)",
            ylabel="layer i (attention)",
            colorbar_label="attention mass",
        ),
    }
    for name, fig in figures.items():
        write_atomic(out / name, to_png(fig))


def format_table(overlap: list[list[float]], mass: list[list[float]]) -> str:
    """Per layer: own mass, overlap / mass with the previous layer's top-k, best earlier source."""
    header = ("layer", "own_mass", "overlap_prev", "mass_prev", "best_src", "best_mass")
    rows = [header]
    for i in range(len(overlap)):
        prev = (f"{overlap[i][i - 1]:.3f}", f"{mass[i][i - 1]:.3f}") if i else ("-", "-")
        earlier = [(mass[i][j], j) for j in range(i) if mass[i][j] == mass[i][j]]  # not NaN
        best = (str(max(earlier)[1]), f"{max(earlier)[0]:.3f}") if earlier else ("-", "-")
        rows.append((str(i), f"{mass[i][i]:.3f}", *prev, *best))
    widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)
