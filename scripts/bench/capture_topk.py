"""Top-k indices of a trained indexer on real text, saved for the sparse-attention benchmarks.

Kernel timings depend on the index pattern: random stratified indices (neighbouring query rows
share almost nothing) are the worst case for gathers and dKV atomics, while a trained indexer's
neighbouring rows share most of their keys. This runs an all-Full checkpoint (HF format, as
``checkpoint_tools export`` writes it) over one corpus sequence with sparse attention as served
and saves the chosen layers' top-k, ``{layer: [1, S, K] int32}``, for
``bench_sparse_mla.py --patterns file:PATH``. ``--topk`` overrides the checkpoint's
``index_topk`` (the indexer's scores do not depend on it), so a model trained at k = 512 can
produce the k = 2048 selections the production kernels see. It prints, per layer, the row-block
gain (valid slots / union entries at 4 rows per block) and the mean overlap of neighbouring rows.

    python scripts/bench/capture_topk.py --hf HF_DIR --data PREFIX --seq 32768 --topk 2048 \
        --layers 3,7 --out /tmp/topk.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, as _common does


def capture(model, cfg, tokens_BS: torch.Tensor, topk: int, layers: list[int]) -> dict:
    """``{layer: idx_BSK}`` of one sparse forward over ``tokens_BS`` with ``index_topk=topk``."""
    from indexcache_train.model.forward_state import DSAForwardState
    from indexcache_train.tools.overlap_cli import attention_modules

    for attn in attention_modules(model):
        attn.dims = dataclasses.replace(attn.dims, index_topk=topk)
    B, S = tokens_BS.shape
    positions = torch.arange(S, device=tokens_BS.device).expand(B, S)
    state = DSAForwardState(cfg.schedule, positions, attention="sparse", captured_topk={})
    with torch.no_grad():
        model(tokens_BS, positions, None, dsa_state=state)
    return {i: state.captured_topk[i].to(torch.int32).contiguous() for i in layers}


def neighbour_overlap(idx_BSK: torch.Tensor, rows: int = 512) -> float:
    """Mean |T_s & T_{s+1}| / |T_{s+1}| over ``rows`` evenly spaced rows past the first k."""
    _, S, K = idx_BSK.shape
    picks = torch.linspace(K + 1, S - 1, min(rows, max(1, S - K - 1))).long().tolist()
    fr = []
    for s in picks:
        a = set(idx_BSK[0, s - 1][idx_BSK[0, s - 1] >= 0].tolist())
        b = idx_BSK[0, s][idx_BSK[0, s] >= 0].tolist()
        fr.append(sum(x in a for x in b) / max(1, len(b)))
    return sum(fr) / max(1, len(fr))


def main() -> int:
    from indexcache_train.ops.sparse_plan import build_row_block_plan
    from indexcache_train.tools.overlap_cli import build, calibration_batches

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf", type=Path, help="all-Full HF checkpoint directory")
    ap.add_argument("--model", default=None, help="a preset with random weights instead of --hf")
    ap.add_argument("--data", default="random", help="Megatron indexed-dataset prefix or 'random'")
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--layers", default="0", help="comma-separated trunk layer indices")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.batches, args.batch_size = 1, 1
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    cfg, model, label = build(args, dtype)
    model = model.to(args.device)
    tokens = calibration_batches(args, cfg.vocab_size)[0].to(args.device)
    layers = [int(x) for x in args.layers.split(",")]
    got = capture(model, cfg, tokens, args.topk, layers)
    for i, idx in got.items():
        gain = build_row_block_plan(idx, 4).gain
        print(
            f"layer {i}: {label}, S={idx.shape[1]}, k={idx.shape[2]}, row-block gain (4 rows) "
            f"{gain:.2f}, neighbour overlap {neighbour_overlap(idx):.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    torch.save({i: t.cpu() for i, t in got.items()}, tmp)
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
