"""convert-schedule streams: a >= 1 GiB, 8-shard checkpoint converts with < 256 MiB RSS growth.

The checkpoint is synthetic (real GLM-5 tensor names and shapes from a scaled-down config, bytes
drawn from a random pool) and is itself written with :class:`ShardedCheckpointWriter`. The
conversion runs in a fresh subprocess that records its RSS after all imports (torch included,
so import cost is not counted as growth) and then samples it every few milliseconds; the
kernel's high-water mark (``VmHWM``) is checked too, so a spike between samples cannot hide.
(Not ``ru_maxrss``: Linux carries it over from the forking parent, here the pytest process.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from checkpoint_tools.hf_io import HFCheckpoint, ShardedCheckpointWriter, plan_shards
from checkpoint_tools.layout import expected_tensors
from checkpoint_tools.safetensors_format import TensorSpec
from checkpoint_tools.validation import validate_hf_checkpoint
from indexcache_train.schedule import IndexCacheSchedule

GiB, MiB = 2**30, 2**20
RSS_BUDGET = 256 * MiB
N_LAYERS = 6
CONFIG: dict[str, Any] = {
    "architectures": ["GlmMoeDsaForCausalLM"],
    "model_type": "glm_moe_dsa",
    "dtype": "bfloat16",
    "vocab_size": 32768,
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "moe_intermediate_size": 1024,
    "num_hidden_layers": N_LAYERS,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "q_lora_rank": 512,
    "kv_lora_rank": 256,
    "qk_rope_head_dim": 32,
    "qk_nope_head_dim": 64,
    "v_head_dim": 64,
    "n_routed_experts": 24,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "first_k_dense_replace": 1,
    "index_topk": 2048,
    "index_head_dim": 128,
    "index_n_heads": 16,
}

CONVERT_AND_MEASURE = """
import json, sys, threading, time
import psutil
import torch  # noqa: F401  (imported before the baseline: import cost is not growth)
from checkpoint_tools.convert_schedule import ScheduleRequest, convert_schedule

proc = psutil.Process()
baseline = proc.memory_info().rss
peak = baseline
done = threading.Event()

def sample():
    global peak
    while not done.is_set():
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.002)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
convert_schedule(sys.argv[1], sys.argv[2], ScheduleRequest(4, 3), shard_size=int(sys.argv[3]))
seconds = time.perf_counter() - start
done.set()
thread.join()
peak = max(peak, proc.memory_info().rss)
hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"baseline": baseline, "peak_sampled": peak, "vm_hwm": hwm_kib * 1024,
                  "seconds": seconds}))
"""


def _specs() -> list[TensorSpec]:
    schedule = IndexCacheSchedule.all_full(N_LAYERS, 1)
    specs = []
    for name, exp in expected_tensors(CONFIG, schedule).items():
        if exp.optional:
            continue
        fp32 = exp.fp32_only or name.endswith("weights_proj.weight")
        specs.append(TensorSpec(name, "F32" if fp32 else "BF16", exp.shape))
    return specs


def _eight_shard_size(specs: list[TensorSpec]) -> int:
    """Smallest max-shard size (searched) that splits the checkpoint into exactly 8 shards."""
    lo, hi = max(s.nbytes for s in specs), sum(s.nbytes for s in specs)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(plan_shards(specs, mid)) > 8:
            lo = mid + 1
        else:
            hi = mid
    assert len(plan_shards(specs, lo)) == 8
    return lo


def _write_synthetic(directory: Path, specs: list[TensorSpec], shard_size: int) -> None:
    largest = max(s.nbytes for s in specs)
    pool = torch.randint(
        0, 256, (largest + 8 * MiB,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    dtypes = {"BF16": torch.bfloat16, "F32": torch.float32}
    with ShardedCheckpointWriter(
        directory, specs, max_shard_size=shard_size, fsync=False
    ) as writer:
        writer.write_json("config.json", CONFIG)
        for spec in specs:
            start = (
                zlib.crc32(spec.name.encode()) % (len(pool) - spec.nbytes) // 4 * 4
            )  # aligned views
            data = pool[start : start + spec.nbytes].view(dtypes[spec.dtype]).reshape(spec.shape)
            writer.write_tensor(spec.name, data)


def _same_bytes(a: HFCheckpoint, b: HFCheckpoint, name: str) -> bool:
    ta, tb = a.read_tensor(name), b.read_tensor(name)
    if (ta.dtype, ta.shape) != (tb.dtype, tb.shape):
        return False
    return torch.equal(ta.reshape(-1).view(torch.uint8), tb.reshape(-1).view(torch.uint8))


def test_streaming_conversion_memory(
    tmp_path: Path, subprocess_env: dict[str, str], repo_root: Path
) -> None:
    started = time.perf_counter()
    specs = _specs()
    total = sum(s.nbytes for s in specs)
    assert total >= GiB
    shard_size = _eight_shard_size(specs)
    src, out = tmp_path / "big", tmp_path / "big_freq4"
    _write_synthetic(src, specs, shard_size)
    source = HFCheckpoint(src)
    assert len(source.shard_files) == 8 and source.total_size == total

    done = subprocess.run(
        [sys.executable, "-c", CONVERT_AND_MEASURE, str(src), str(out), str(shard_size)],
        env=subprocess_env,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    growth = max(stats["peak_sampled"], stats["vm_hwm"]) - stats["baseline"]
    print(
        f"converted {total / GiB:.2f} GiB in {stats['seconds']:.1f} s; RSS growth {growth / MiB:.1f} MiB {stats}"
    )
    assert growth < RSS_BUDGET

    converted = HFCheckpoint(out)
    dropped = {
        n
        for n in source.names
        if any(n.startswith(f"model.layers.{i}.self_attn.indexer.") for i in (3, 4, 5))
    }
    assert len(dropped) == 15
    assert set(converted.names) == set(source.names) - dropped
    assert all(_same_bytes(source, converted, name) for name in converted.names)
    assert validate_hf_checkpoint(converted).ok
    assert time.perf_counter() - started < 60
