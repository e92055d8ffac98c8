"""Error of evaluation's sampled-rows recall and per-pair KL against every row (CPU toy, 8K).

Evaluation measures recall and the per-pair KL on ``eval_rows`` query rows per sequence
(:mod:`indexcache_train.loss.eval_sample`). This script runs the same sequences once with every
row measured and once per sample size and draw of the sample's offsets (the module's seed,
fixed in training, varied here to see the spread), and prints per sample size the wall time of
the evaluation forward and the error of each layer's recall (absolute) and each served pair's
KL (relative), RMS and max over sequences, draws, layers / pairs::

    python scripts/experiments/eval_sample_error.py                     # 8K, sparse
    python scripts/experiments/eval_sample_error.py --attention dense   # the warm-up's form

Model: the 4-layer GLM-5 toy (freq 2, MTP off), ``index_topk`` 512, initialised with
``initializer_range`` 0.1 (peaked attention), on the bundled corpus's validation tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _init() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from indexcache_train import compat

    compat.apply()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29791")
    dist.init_process_group("gloo", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    compat.model_parallel_seed(0)


def _tokens(seq: int, count: int) -> torch.Tensor:
    """``count`` sequences of ``seq`` validation tokens of the bundled corpus, ``[count, seq]``."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(REPO / "data/default/val"))
    flat, need = [], seq * count
    for i in range(len(ds)):
        flat.append(torch.from_numpy(ds[i].astype("int64")))
        if sum(len(t) for t in flat) >= need:
            break
    return torch.cat(flat)[:need].view(count, seq)


def _measure(model, cfg, ids_S: torch.Tensor, attention: str, eval_rows: int) -> dict:
    from indexcache_train.model.forward_state import DistillSettings, DSAForwardState

    S = ids_S.shape[0]
    pos = torch.arange(S)[None]
    st = DSAForwardState(
        cfg.schedule,
        pos,
        attention=attention,
        distill=DistillSettings(mode="multi", compute_grad=False),
        measure_recall=True,
        eval_rows=eval_rows,
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        model(ids_S[None], pos, None, dsa_state=st)
    return {
        "seconds": time.perf_counter() - t0,
        "recall": {k: float(v[0] / v[1]) for k, v in st.recall.items()},
        "kl": {f"{a}->{b}": float(v) for (a, b), v in st.kl_terms.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--sequences", type=int, default=2)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--attention", choices=["sparse", "dense"], default="sparse")
    args = ap.parse_args()
    _init()
    from indexcache_train.loss import eval_sample
    from indexcache_train.model.config import ModelConfig
    from indexcache_train.model.factory import ParallelSettings, build_model, transformer_config
    from indexcache_train.model.toy_configs import glm5_toy_hf_config

    hf = glm5_toy_hf_config(
        num_mtp_layers=0,
        vocab_size=50304,
        index_topk_freq=2,
        index_skip_topk_offset=1,
        index_topk=512,
        initializer_range=0.1,
        max_position_embeddings=args.seq,
    )
    cfg = ModelConfig.from_hf_config(hf)
    torch.manual_seed(0)
    par = ParallelSettings(moe_token_dispatcher_type="allgather")
    model = build_model(cfg, transformer_config(cfg, par)).eval()
    seed = eval_sample.SEED
    seqs = _tokens(args.seq, args.sequences)
    exact = [_measure(model, cfg, s, args.attention, 0) for s in seqs]
    table = {"exact_seconds": statistics.mean(x["seconds"] for x in exact)}
    for rows in args.rows:
        rec, kl, seconds = [], [], []
        for draw in range(args.draws):
            eval_sample.SEED = seed + draw
            for s, e in zip([_measure(model, cfg, x, args.attention, rows) for x in seqs], exact):
                seconds.append(s["seconds"])
                rec += [s["recall"][k] - e["recall"][k] for k in e["recall"]]
                kl += [s["kl"][k] / e["kl"][k] - 1 for k in e["kl"]]
        table[rows] = {
            "seconds": statistics.mean(seconds),
            "recall_abs_err_rms": math.sqrt(statistics.mean(x * x for x in rec)),
            "recall_abs_err_max": max(map(abs, rec)),
            "kl_rel_err_rms": math.sqrt(statistics.mean(x * x for x in kl)),
            "kl_rel_err_max": max(map(abs, kl)),
        }
    eval_sample.SEED = seed
    table["exact_recall"] = [e["recall"] for e in exact]
    table["exact_kl"] = [e["kl"] for e in exact]
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
