"""Loss and gradients of a toy IndexCache model at a parallel layout vs one process.

    python parallel_equivalence.py reference --work DIR [--attention sparse|dense]
    torchrun --nproc-per-node 2 parallel_equivalence.py parallel --work DIR --scenario tp2sp|ep2|dp2|cp2|...

``reference`` builds the toy (fixed seed), saves it as a dist checkpoint, runs one training
forward/backward through Megatron's schedule (DDP, distillation loss on) on a fixed batch and
saves the loss and every full gradient. ``parallel`` loads that checkpoint at the given layout
(dist-checkpointing reshards), runs the same global batch split the way the layout splits it,
reassembles full gradients (TP shards, EP experts) and compares on rank 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from indexcache_train import compat  # noqa: E402

compat.apply()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

B, S = 4, 32
DEVICE = "cpu"  # --device cuda: the GPU confirmation (NCCL, bf16, GPU kernels)
BF16 = False
SCENARIOS = {
    "tp2sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "ep2": dict(expert_model_parallel_size=2),
    "dp2": dict(),
    "cp2": dict(context_parallel_size=2),
    # TP2+SP with the chunked LM head + loss (model/lm_loss.py): 24-token chunks over 16 local
    # rows per rank (uneven last chunk), compared with the unchunked one-process reference.
    "tp2sp_lmchunk": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    # 4 processes: each TP rank's indexer / distillation rows are a quarter of the sequence,
    # and TP x SP composed with CP's zigzag rows.
    "tp4sp": dict(tensor_model_parallel_size=4, sequence_parallel=True),
    "tp2sp_cp2": dict(
        tensor_model_parallel_size=2, sequence_parallel=True, context_parallel_size=2
    ),
}
LM_LOSS_CHUNK = {"tp2sp_lmchunk": 24}
# EP=2 with the grouped-GEMM experts (model/grouped_experts.py) against the SequentialMLP
# reference: it must load the same dist checkpoint and give the same loss and gradients.
SCENARIOS["ep2_grouped"] = SCENARIOS["ep2"]
GROUPED_EXPERTS = {"ep2_grouped"}
COUNTED = ("indexer_topk", "distill_target", "distill_kl", "state_peak_bytes")
SCENARIO = None


MTP_LAYERS = 1


def _hf_config():
    from indexcache_train.model.toy_configs import glm5_toy_hf_config

    # 4 layers: 0 dense MLP, 1-3 MoE; freq 2 -> FSFS, MTP Full; index_topk < S so selection matters.
    return glm5_toy_hf_config(
        num_hidden_layers=4,
        index_topk_freq=2,
        index_skip_topk_offset=1,
        num_mtp_layers=MTP_LAYERS,
        index_topk=8,
    )


def _setup(scenario: str | None):
    from megatron.core import parallel_state as ps

    from indexcache_train.model.factory import ParallelSettings

    kw = SCENARIOS[scenario] if scenario else {}
    if not dist.is_initialized():
        if DEVICE == "cuda":
            import os

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(compat.distributed_backend())
    ps.initialize_model_parallel(
        tensor_model_parallel_size=kw.get("tensor_model_parallel_size", 1),
        expert_model_parallel_size=kw.get("expert_model_parallel_size", 1),
        context_parallel_size=kw.get("context_parallel_size", 1),
    )
    compat.model_parallel_seed(0)
    # Per-token loss: gradients are normalised by the global token count (finalize_model_grads),
    # so every layout computes exactly the one-process gradient, MTP included (Megatron's
    # per-micro-batch mean would weigh CP ranks' MTP tokens unequally: the last rank loses the
    # rolled-off position).
    dtype = {"params_dtype": torch.bfloat16, "bf16": True} if BF16 else {}
    return ParallelSettings(
        moe_token_dispatcher_type="allgather",
        calculate_per_token_loss=True,
        use_cpu_initialization=True,
        **dtype,
        **kw,
    )


def _build(par):
    from indexcache_train.model.config import ModelConfig
    from indexcache_train.model.factory import build_model, transformer_config
    from indexcache_train.model.specs import LOCAL, LOCAL_GROUPED

    cfg = ModelConfig.from_hf_config(_hf_config())
    torch.manual_seed(0)
    chunk = LM_LOSS_CHUNK.get(SCENARIO, 0)
    backend = LOCAL_GROUPED if SCENARIO in GROUPED_EXPERTS else LOCAL
    model = build_model(cfg, transformer_config(cfg, par), lm_loss_chunk=chunk, backend=backend)
    return cfg, model.to(DEVICE)


def _batch():
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 512, (B, S + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def _run(cfg, model, attention: str, dp_rank: int, dp: int, cp_rank: int, cp: int):
    """One training step's forward/backward through Megatron's schedule; returns the loss, this
    rank's work counts (FLOPs by :mod:`indexcache_train.ops.flop_counter` category, and the
    forward state's peak bytes) and the DDP wrapper."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from indexcache_train.model.forward_state import (
        DistillSettings,
        DSAForwardState,
        take_state_peak_bytes,
    )
    from indexcache_train.ops import flop_counter
    from indexcache_train.ops.masking import KeyRange
    from indexcache_train.parallel.context_parallel import split_for_rank

    warmup = attention == "warmup"
    if warmup:  # dense warm-up: only Full-layer indexers train; the trunk is frozen, no graph
        for name, p in model.named_parameters():
            p.requires_grad_(".core_attention.indexer." in name)
        attention = "dense"
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(use_distributed_optimizer=False), model
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    tokens, labels = _batch()
    rows = slice(dp_rank * B // dp, (dp_rank + 1) * B // dp)
    tokens, labels = tokens[rows], labels[rows]
    b = tokens.shape[0]
    pos = torch.arange(S).expand(b, S)
    tokens, labels, pos = (split_for_rank(t, cp, cp_rank).to(DEVICE) for t in (tokens, labels, pos))
    key_range = KeyRange.build(b, S // cp, DEVICE, query_index_BS=pos) if cp > 1 else None
    losses = []

    def step(it, m):
        st = DSAForwardState(
            cfg.schedule,
            pos,
            key_range=key_range,
            attention=attention,
            distill=DistillSettings(mode="multi"),
        )
        with torch.no_grad() if warmup else contextlib.nullcontext():
            out = m(tokens, pos, None, labels=labels, dsa_state=st)

        def loss_fn(o):
            # Megatron's 3-value form (sum, token count) with calculate_per_token_loss.
            total = o.float().sum()
            losses.append(total.detach().clone() / o.numel())
            return (
                total,
                torch.tensor(o.numel(), dtype=torch.int, device=o.device),
                {"loss": losses[-1]},
            )

        return out, loss_fn

    evaluation = _evaluate(cfg, model, attention, tokens, labels, pos, key_range)
    take_state_peak_bytes()  # the period starts here
    with flop_counter.counting() as counts:
        get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([None]),
            model=[ddp],
            num_microbatches=1,
            seq_length=S // cp,
            micro_batch_size=b,
            forward_only=False,
        )
    loss = losses[0].clone()
    dist.all_reduce(loss)  # mean of equal-sized shards = global mean
    counts["state_peak_bytes"] = float(take_state_peak_bytes())
    return float(loss) / dist.get_world_size(), {**counts, **evaluation}, ddp


EVAL_ROWS = 8  # of S = 32: one measured position per block of 4


def _evaluate(cfg, model, attention, tokens, labels, pos, key_range) -> dict[str, float]:
    """The evaluation metrics (recall per layer, KL per served pair) on the sampled rows
    (``eval_rows``), summed over ranks as the trainer's step runner does."""
    from indexcache_train.model.forward_state import DistillSettings, DSAForwardState

    st = DSAForwardState(
        cfg.schedule,
        pos,
        key_range=key_range,
        attention=attention,
        distill=DistillSettings(mode="multi", compute_grad=False),
        measure_recall=True,
        eval_rows=EVAL_ROWS,
    )
    with torch.no_grad():
        model(tokens, pos, None, labels=labels, dsa_state=st)
    recall = torch.stack([st.recall[k] for k in sorted(st.recall)]).double()
    kl = torch.stack([st.kl_terms[k].double() for k in sorted(st.kl_terms)])
    dist.all_reduce(recall)
    dist.all_reduce(kl)  # per-row means of equal-sized row shards: their mean is the mean
    out = {f"recall{k}": float(h / n) for k, (h, n) in zip(sorted(st.recall), recall.tolist())}
    out["recall_rows"] = float(recall[:, 1].sum())
    kl = kl / dist.get_world_size()
    out.update({f"kl{a}-{b}": float(v) for (a, b), v in zip(sorted(st.kl_terms), kl.tolist())})
    return out


def _indexer_grad_norm(model, ddp) -> float:
    """The ``"indexer"`` grad-norm group as the trainer reads it after Megatron's optimizer step
    (TP duplicates filtered, reduced over the model-parallel group). Clips and updates the
    parameters: call after the gradients are read."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from indexcache_train.compat import INDEXER_GRAD_NORM_GROUP
    from indexcache_train.training.update import _group_grad_norm

    for name, p in model.named_parameters():
        if ".core_attention.indexer." in name:
            p.grad_norm_group = INDEXER_GRAD_NORM_GROUP
    opt = get_megatron_optimizer(OptimizerConfig(lr=0.0, clip_grad=1.0), [ddp])
    opt.step()
    return _group_grad_norm(opt, INDEXER_GRAD_NORM_GROUP)


def _full_grads(model) -> dict[str, torch.Tensor]:
    """Reassemble full gradients: TP shards along their partition dim, EP experts by global id."""
    from megatron.core import parallel_state as ps

    out = {}
    tp, ep = ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size()
    ep_rank = ps.get_expert_model_parallel_rank()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = p.main_grad.detach().float().clone()
        is_expert = ".experts.local_experts." in name
        # Experts are split over the expert-TP group (= TP by default), the rest over TP.
        group = (
            ps.get_expert_tensor_parallel_group()
            if is_expert
            else ps.get_tensor_model_parallel_group()
        )
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(g) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, g, group=group)
            if name.endswith("linear_fc1.weight"):
                # Gated MLP: each rank holds [gate_shard; up_shard] (Megatron's swiglu layout).
                halves = [q.chunk(2, dim=0) for q in parts]
                g = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
            else:
                g = torch.cat(parts, dim=p.partition_dim)
        if is_expert and ep > 1:
            head, rest = name.split(".experts.local_experts.")
            local, tail = rest.split(".", 1)
            n_local = len(model.decoder.layers[1].mlp.experts.local_experts)
            name = f"{head}.experts.local_experts.{ep_rank * n_local + int(local)}.{tail}"
            parts = [None] * ep
            dist.all_gather_object(parts, (name, g), group=ps.get_expert_model_parallel_group())
            for n, t in parts:
                out[n] = t
            continue
        out[name] = g
    return out


def _suffix() -> str:
    return "" if MTP_LAYERS else "_nomtp"


def reference(work: Path, attention: str) -> None:
    from megatron.core import dist_checkpointing

    par = _setup(None)
    cfg, model = _build(par)
    (work / f"ckpt{_suffix()}").mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(work / f"ckpt{_suffix()}"))
    loss, counts, ddp = _run(cfg, model, attention, 0, 1, 0, 1)
    grads = _full_grads(model)
    ref = {
        "loss": loss,
        "grads": grads,
        "counts": counts,
        "indexer_norm": _indexer_grad_norm(model, ddp),
    }
    torch.save(ref, work / f"ref_{attention}{_suffix()}.pt")


def parallel(work: Path, scenario: str, attention: str) -> int:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    par = _setup(scenario)
    cfg, model = _build(par)
    model.load_state_dict(
        dist_checkpointing.load(model.sharded_state_dict(), str(work / f"ckpt{_suffix()}"))
    )
    dp, cp = ps.get_data_parallel_world_size(), ps.get_context_parallel_world_size()
    loss, counts, ddp = _run(
        cfg, model, attention, ps.get_data_parallel_rank(), dp, ps.get_context_parallel_rank(), cp
    )
    grads = _full_grads(model)
    indexer_norm = _indexer_grad_norm(model, ddp)
    all_counts = [None] * dist.get_world_size()
    dist.all_gather_object(all_counts, counts)
    try:
        if dist.get_rank() == 0:
            _compare(work, scenario, attention, loss, grads, indexer_norm, all_counts)
    finally:
        # Every rank leaves together and tears the groups down: a gloo rank that exits while its
        # peer still holds the group can abort in the C++ destructor ("terminate called without
        # an active exception"), failing a run whose comparison passed.
        dist.barrier()
        ps.destroy_model_parallel()
        dist.destroy_process_group()
    return 0


def _compare(
    work: Path,
    scenario: str,
    attention: str,
    loss: float,
    grads: dict,
    indexer_norm: float,
    all_counts: list[dict[str, float]],
) -> None:
    ref = torch.load(work / f"ref_{attention}{_suffix()}.pt")
    # Norm-wise relative error per tensor, floored at 1e-5 of the whole model's gradient norm so
    # structurally ~0 gradients (e.g. an indexer k_norm bias, ~1e-6) are judged on the model's
    # scale rather than on fp32 summation-order noise (a real bug, e.g. a factor 2, still shows).
    floor = 1e-5 * torch.stack([g.norm() for g in ref["grads"].values()]).norm()
    worst = {}
    for name, g_ref in ref["grads"].items():
        g = grads[name]
        if g.shape != g_ref.shape:
            raise SystemExit(
                f"{name}: reassembled gradient {tuple(g.shape)} != reference {tuple(g_ref.shape)}"
            )
        worst[name] = float((g - g_ref).norm() / torch.maximum(g_ref.norm(), floor))
    result = {
        "scenario": scenario,
        "attention": attention,
        "loss": loss,
        "ref_loss": ref["loss"],
        "loss_rel": abs(loss - ref["loss"]) / abs(ref["loss"]),
        "max_grad_rel": max(worst.values()),
        "worst_param": max(worst, key=worst.get),
        "missing": sorted(set(ref["grads"]) - set(grads)),
        "top5": sorted(worst.items(), key=lambda kv: -kv[1])[:5],
        # Equal-but-zero gradients would pass the comparison: record that the indexers learn.
        "ref_indexer_grad_norm": float(
            torch.stack([g.norm() for n, g in ref["grads"].items() if ".indexer." in n]).norm()
        ),
        # The optimizer's "indexer" grad-norm group: counts each TP-summed gradient once.
        "indexer_norm_rel": abs(indexer_norm - ref["indexer_norm"]) / ref["indexer_norm"],
        # Per-rank FLOPs of the indexer top-k and the distillation terms, and the forward
        # state's peak bytes, over the one-process run's: 1 / world when every rank holds and
        # does its own share (no replicated rows).
        "share": {
            c: [f.get(c, 0.0) / v for f in all_counts]
            for c, v in sorted(ref["counts"].items())
            if c in COUNTED
        },
        # Evaluation on sampled rows: the same positions at every layout, the same metrics.
        "eval_max_abs": max(
            abs(all_counts[0][k] - v) for k, v in ref["counts"].items() if k not in COUNTED
        ),
        "eval_recall_rows": all_counts[0]["recall_rows"],
    }
    (work / f"result_{scenario}_{attention}{_suffix()}.json").write_text(
        json.dumps(result, indent=1)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["reference", "parallel"])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--attention", default="sparse", choices=["sparse", "dense", "warmup"])
    ap.add_argument("--no-mtp", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    DEVICE, BF16, SCENARIO = args.device, args.bf16, args.scenario
    if args.no_mtp:
        MTP_LAYERS = 0
    if args.mode == "reference":
        reference(args.work, args.attention)
    else:
        sys.exit(parallel(args.work, args.scenario, args.attention))
