"""``checkpoint_tools import`` under ``torchrun --nproc-per-node 2`` (gloo) at TP=2, PP=2 and EP=2.

Each rank reads only its slices. Two checks per layout: inside the job, every rank reloads the
checkpoint with another expert TP (resharding) and compares it with a stage filled straight from
the HF files at that layout (``scripts/import_parallel.py``); here, the checkpoint is loaded into
a TP=1 model and compared bit for bit with the HF tensors (FP8: with their dequantisation).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_tools.fp8 import read_dequantized
from checkpoint_tools.hf_io import HFCheckpoint
from checkpoint_tools.megatron_dir import read_model_config
from checkpoint_tools.megatron_runtime import ParallelLayout, build_stage
from indexcache_train.model.hf_mapping import export_hf_state_dict, mappings
from indexcache_train.parallel.layout_format import parse_layout_str
from tests.helpers.hf_toys import make_fp8_checkpoint, make_glm5_toy_config, save_toy_checkpoint
from tests.helpers.megatron_env import init_single_process

SCRIPT = Path(__file__).parent / "scripts" / "import_parallel.py"
#: layout -> (flags, toys imported in the same job).
LAYOUTS = {
    "tp2": (["--tp", "2"], ["glm", "fp8"]),
    "pp2": (["--pp", "2"], ["glm"]),
    "ep2": (["--ep", "2"], ["glm"]),
}


@pytest.fixture(scope="module")
def toys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toys")
    # GLM-5.2 style: Shared trunk and MTP layers, a dense layer, 8 experts, MTP in its own shard.
    glm = save_toy_checkpoint(
        make_glm5_toy_config(index_topk_freq=4, index_skip_topk_offset=3), root / "glm52"
    )
    # 16 x 16 blocks: TP slices of q_b / kv_b / o_proj cut through several blocks.
    return {"glm": glm, "fp8": make_fp8_checkpoint(glm, root / "fp8", block=(16, 16))}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_torchrun_import_loads_exactly(
    case: str,
    toys: dict[str, Path],
    tmp_path: Path,
    subprocess_env: dict[str, str],
    repo_root: Path,
) -> None:
    flags, names = LAYOUTS[case]
    hf = [toys[n] for n in names]
    out = [tmp_path / f"{n}-mcore" for n in names]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(SCRIPT),
        "--hf",
        *map(str, hf),
        "--out",
        *map(str, out),
        *flags,
    ]
    done = subprocess.run(
        cmd, env=subprocess_env, cwd=repo_root, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    equal = [line for line in done.stdout.splitlines() if "tensors equal" in line]
    assert len(equal) == 2 * len(names), done.stdout
    assert done.stdout.count("peak RSS MiB") == len(names)  # the per-rank memory table
    for source, megatron_dir in zip(hf, out):
        meta = json.loads((megatron_dir / "import_metadata.json").read_text())
        assert meta["layout"]["world_size"] == 2 and len(meta["ranks"]) == 2
        assert all(r["peak_rss_mib"] > 0 for r in meta["ranks"])
        assert meta["fp8_dequantized"] == (source == toys["fp8"])
        assert [r["tensors"] for r in meta["ranks"]] == _tensors_per_rank(case, megatron_dir)
        _assert_equals_hf(megatron_dir, HFCheckpoint(source))


def _tensors_per_rank(case: str, megatron_dir: Path) -> list[int]:
    """Each rank fills only its part: all tensors (TP shards), its stage (PP), its experts (EP)."""
    _, cfg = read_model_config(megatron_dir)
    names = [m.megatron for m in mappings(cfg)]
    experts = sum(".local_experts." in n for n in names)
    if case == "ep2":
        return [len(names) - experts // 2] * 2
    if case == "pp2":
        meta = json.loads((megatron_dir / "import_metadata.json").read_text())
        stage0 = parse_layout_str(meta["layout"]["pipeline_model_parallel_layout"])[0]
        prefixes = ("embedding.", *(f"decoder.layers.{i}." for i in range(stage0.count("t"))))
        first = sum(n.startswith(prefixes) for n in names)
        # The MTP stage holds its own copy of the word embeddings (Megatron shares them with MTP).
        return [first, len(names) - first + 1]
    return [len(names)] * 2


def _assert_equals_hf(megatron_dir: Path, source: HFCheckpoint) -> None:
    from megatron.core import dist_checkpointing

    init_single_process()
    _, cfg = read_model_config(megatron_dir)
    model = build_stage(cfg, ParallelLayout(), torch.bfloat16)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(megatron_dir)))
    loaded = export_hf_state_dict(model, cfg)
    expected = [n for n in source.names if not n.endswith("_scale_inv")]
    assert sorted(loaded) == sorted(expected)
    for name in expected:
        want = read_dequantized(source, name)  # raw bytes unless FP8
        assert loaded[name].dtype == want.dtype, name
        assert torch.equal(loaded[name].view(torch.uint8), want.view(torch.uint8)), name
