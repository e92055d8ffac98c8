"""Run under torchrun: ``checkpoint_tools import`` at a TP / PP / EP layout, then reload it at a
layout with another expert TP and compare with a stage filled straight from the HF files.

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed/scripts/import_parallel.py \\
        --hf HF_DIR [HF_DIR2 ...] --out MEGATRON_DIR [MEGATRON_DIR2 ...] --tp 2 --pp 1 --ep 1

Several checkpoints share one job (process start-up dominates on CPU). The import itself runs
the CLI entry point on every rank, so this also covers argument parsing, the world-size check
and the rank-0 commit. Prints ``rank R: N tensors equal (OUT)`` per rank and checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True, nargs="+")
    parser.add_argument("--out", required=True, nargs="+")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    args = parser.parse_args()

    from checkpoint_tools.__main__ import main as cli

    flags = ["--tp", str(args.tp), "--pp", str(args.pp), "--ep", str(args.ep)]
    for hf, out in zip(args.hf, args.out, strict=True):
        rc = cli(["import", "--hf", hf, "--out", out, *flags, "--no-progress"])
        if rc != 0:
            return rc
    for hf, out in zip(args.hf, args.out, strict=True):
        if not check_at_other_layout(hf, out, args.tp, args.pp, args.ep):
            return 1
    return 0


def check_at_other_layout(hf: str, out: str, tp: int, pp: int, ep: int) -> bool:
    """Reload ``out`` with another expert TP than the import used (Megatron's default ETP = TP,
    or 1 where the import used TP) and compare every local tensor with a stage filled straight
    from ``hf`` at that layout."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from checkpoint_tools import megatron_runtime as rt
    from checkpoint_tools.hf_io import HFCheckpoint
    from checkpoint_tools.import_megatron import pipeline_layout_for
    from checkpoint_tools.megatron_dir import read_model_config
    from checkpoint_tools.progress import NullProgress
    from checkpoint_tools.stage_loader import StageSharding, fill_stage

    ps.destroy_model_parallel()
    imported = rt.ParallelLayout.for_import(tp, pp, ep)
    layout = rt.ParallelLayout(tp, pp, ep, etp=1 if imported.etp == tp > 1 else tp)
    rt.init_parallel(layout)
    _, cfg = read_model_config(out)
    pipeline = pipeline_layout_for(cfg, layout)
    loaded = rt.build_stage(cfg, layout, torch.bfloat16, pipeline)
    loaded.load_state_dict(dist_checkpointing.load(loaded.sharded_state_dict(), out))
    direct = rt.build_stage(cfg, layout, torch.bfloat16, pipeline)
    sharding = StageSharding.from_parallel_state(cfg.n_routed_experts)
    fill_stage(direct, cfg, HFCheckpoint(hf), sharding, NullProgress())
    want = direct.state_dict()
    rank = torch.distributed.get_rank()
    checked = 0
    for name, tensor in loaded.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        if not torch.equal(tensor, want[name]):
            print(f"rank {rank}: {name} differs ({out})", flush=True)
            return False
        checked += 1
    print(f"rank {rank}: {checked} tensors equal ({out})", flush=True)
    return True


if __name__ == "__main__":
    sys.exit(main())
