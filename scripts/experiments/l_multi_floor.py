"""The floor of L_multi for a checkpoint and an IndexCache schedule (offline diagnostic, toy sizes).

By Proposition 1, per query row ``sum_j w_j KL(p_j || q) = J + KL(pbar || q)`` with
``J = sum_j w_j KL(p_j || pbar)`` and ``pbar = sum_j w_j p_j``: no indexer can bring L_multi
below J, so a warm-up can cut L_multi by at most ``1 - J / L_multi(start)``. J depends only on
how differently the layers of a share group attend, i.e. on the schedule. This script measures
L_multi and J (dense attention over all causal keys, the warm-up's held-out batches) for a
checkpoint: it holds every layer's ``[B, S, T]`` attention at once, which is fine for the toy
and is exactly what the training loss avoids.

    python scripts/experiments/l_multi_floor.py CHECKPOINT_DIR +experiment=pov_multi [overrides]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main(argv: list[str]) -> None:
    from indexcache_train import compat

    compat.apply()
    from indexcache_train.config.compose import compose
    from indexcache_train.config.validate import validate
    from indexcache_train.data import build_dataloader, build_datasets
    from indexcache_train.model.forward_state import DistillSettings, DSAForwardState
    from indexcache_train.ops import api
    from indexcache_train.ops.distill_reference import head_sum_probs_dense, l1_normalize
    from indexcache_train.training import checkpointing as ckpt
    from indexcache_train.training import runtime
    from indexcache_train.training.model_setup import build_chunks
    from indexcache_train.training.step import multi_loss_by_full_layer

    checkpoint, overrides = Path(argv[0]), argv[1:]
    cfg = compose(overrides)
    resolved = validate(cfg, 1)
    device = runtime.init_process_group(runtime.discover_ranks())
    runtime.init_model_parallel(cfg)
    runtime.seed_everything(cfg.run.seed)
    chunks, _ = build_chunks(cfg, resolved.model, None, device)
    ckpt.load_model_only(checkpoint, chunks)
    model = chunks[0].eval()
    schedule = resolved.model.schedule
    o, seq = cfg.optim, cfg.model.seq_length
    _, valid_ds = build_datasets(
        cfg.data,
        seq_length=seq,
        train_samples=o.global_batch_size,
        valid_samples=cfg.logging.eval_iters * o.global_batch_size,
        seed=cfg.run.seed,
    )
    loader = iter(
        build_dataloader(
            valid_ds,
            o.micro_batch_size,
            0,
            data_parallel_rank=0,
            data_parallel_size=1,
            num_workers=0,
        )
    )

    captured: list[torch.Tensor] = []
    real_dense_distill = api.dense_distill

    def capture(**kw):
        # Called once per served layer, in layer order: keep its whole target p (test-size only).
        q_BSHD, k_BTHD = kw["attn_q_BSHD"], kw["attn_k_BTHD"]
        valid_BST = kw["key_range"].dense_mask(k_BTHD.shape[1])
        p = head_sum_probs_dense(q_BSHD, k_BTHD, kw["attn_lse_BSH"], valid_BST, kw["attn_scale"])
        captured.append(l1_normalize(p))
        return real_dense_distill(**kw)

    api.dense_distill = capture
    uniform = DistillSettings(mode="multi", compute_grad=False)
    kl_sum: dict[tuple[int, int], float] = {}
    floor_sum: dict[int, float] = {}
    batches = cfg.logging.eval_iters * resolved.num_microbatches
    for _ in range(batches):
        batch = next(loader)
        pos = batch["position_ids"].to(device)
        state = DSAForwardState(schedule, pos, attention="dense", distill=uniform)
        captured.clear()
        with torch.no_grad():
            model(batch["tokens"].to(device), pos, None, dsa_state=state)
        layers = sorted(m for g in schedule.groups for m in g.members)
        p_by_layer = dict(zip(layers, captured, strict=True))
        for pair, value in state.kl_terms.items():
            kl_sum[pair] = kl_sum.get(pair, 0.0) + float(value) / batches
        for g in schedule.groups:
            ps_J = [p_by_layer[m] for m in g.members]
            pbar = sum(uniform.weight(j, g.size) * p for j, p in enumerate(ps_J))
            rows = ps_J[0].shape[0] * ps_J[0].shape[1]
            j_gap = sum(
                uniform.weight(j, g.size) * (torch.xlogy(p, p) - torch.xlogy(p, pbar)).sum().item()
                for j, p in enumerate(ps_J)
            )
            floor_sum[g.source] = floor_sum.get(g.source, 0.0) + j_gap / rows / batches
    per_full = multi_loss_by_full_layer(kl_sum, schedule, uniform)
    print(f"schedule {schedule.pattern}; checkpoint {checkpoint}")
    print("| Full layer | group | L_multi | floor J | max cut |")
    print("|---|---|---|---|---|")
    for g in schedule.groups:
        lm, j = per_full[g.source], floor_sum[g.source]
        print(f"| {g.source} | {list(g.members)} | {lm:.4f} | {j:.4f} | {1 - j / lm:.0%} |")
    mean_l = sum(per_full.values()) / len(per_full)
    mean_j = sum(floor_sum.values()) / len(floor_sum)
    print(f"| mean | | {mean_l:.4f} | {mean_j:.4f} | {1 - mean_j / mean_l:.0%} |")


if __name__ == "__main__":
    main(sys.argv[1:])
