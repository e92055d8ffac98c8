"""One DSA attention layer, forward + backward: ours (all-Full) vs stock Megatron-Core 0.19.2.

The stock anchor (``perf-anchors.md``): ``DSAttention`` without a fused backend, 16 heads, qk 192
(128 + 64), v 128, indexer 32x128, k 2048, training with its indexer loss: 435 ms at 1,536
tokens, OOM from 2,048 on. Ours: ``DSASelfAttention`` of the same shape (hidden 2048, q/kv LoRA
1536/512 as DeepSeek-V3.2), Full layer, sparse stage, its own-layer distillation term. Both
measured in the same run; stock's core attention is fed the (non-absorbed) q/k/v it expects.

    python scripts/bench/bench_dsa_layer.py [--seqs 1536,4096,16384]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from _common import OOM, attempt, device_line, free, git_rev, peak_gib, table, time_ms

H, NOPE, ROPE, V, NIDX_H, DI, K, HID = 16, 128, 64, 128, 32, 128, 2048, 2048


def _ours(seq: int):
    from indexcache_train.model.factory import ParallelSettings
    from indexcache_train.model.forward_state import DistillSettings, DSAForwardState
    from indexcache_train.model.toy_configs import dsv32_toy_hf_config
    from tests.helpers.models import build_toy

    hf = dsv32_toy_hf_config(
        num_mtp_layers=0,
        num_hidden_layers=1,
        hidden_size=HID,
        num_attention_heads=H,
        num_key_value_heads=H,
        qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE,
        v_head_dim=V,
        q_lora_rank=1536,
        kv_lora_rank=512,
        index_n_heads=NIDX_H,
        index_head_dim=DI,
        index_topk=K,
        first_k_dense_replace=1,
        intermediate_size=256,
        vocab_size=1024,
        max_position_embeddings=163840,
    )
    par = ParallelSettings(
        params_dtype=torch.bfloat16,
        bf16=True,
        use_cpu_initialization=False,
        moe_token_dispatcher_type="alltoall",
    )
    cfg, model = build_toy(hf, par)
    attn = model.decoder.layers[0].self_attention.cuda()
    x = torch.randn(seq, 1, HID, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(seq, device="cuda")[None]

    def step():
        st = DSAForwardState(
            cfg.schedule, pos, attention="sparse", distill=DistillSettings(mode="own_layer")
        )
        out, _ = attn(x, dsa_state=st)
        out.float().sum().backward()

    return step


def _stock(seq: int):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.experimental_attention_variant.dsa import (
        DSAIndexer,
        DSAIndexerSubmodules,
        DSAttention,
        DSAttentionSubmodules,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from indexcache_train.compat import DuplicatedLinear, LayerNorm

    cfg = MLATransformerConfig(
        num_layers=1,
        hidden_size=HID,
        num_attention_heads=H,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_head_dim=NOPE,
        qk_pos_emb_head_dim=ROPE,
        v_head_dim=V,
        rope_type="rope",
        experimental_attention_variant="dsa",
        dsa_indexer_n_heads=NIDX_H,
        dsa_indexer_head_dim=DI,
        dsa_indexer_topk=K,
        dsa_indexer_loss_coeff=1.0,
        dsa_indexer_rotate_activation=False,
        params_dtype=torch.bfloat16,
        bf16=True,
        normalization="RMSNorm",
        add_bias_linear=False,
    )
    spec = ModuleSpec(
        module=DSAIndexer,
        submodules=DSAIndexerSubmodules(
            linear_wq_b=DuplicatedLinear,
            linear_wk=DuplicatedLinear,
            k_norm=LayerNorm,
            linear_weights_proj=DuplicatedLinear,
        ),
    )
    core = DSAttention(
        cfg,
        DSAttentionSubmodules(indexer=spec),
        layer_number=1,
        attn_mask_type=AttnMaskType.causal,
        attention_type="self",
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    ).cuda()
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    q, k, v = mk(seq, 1, H, NOPE + ROPE), mk(seq, 1, H, NOPE + ROPE), mk(seq, 1, H, V)
    x, qr = mk(seq, 1, HID), mk(seq, 1, 1536)

    def step():
        out = core(q, k, v, None, x, qr, attn_mask_type=AttnMaskType.causal)
        out.float().sum().backward()

    return step


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="1536,2048,4096,16384")
    ap.add_argument("--out", default=os.environ.get("OUT", "outputs/bench"))
    args = ap.parse_args()
    from indexcache_train.training import runtime

    runtime.init_process_group(runtime.discover_ranks())
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(1, 1)
    runtime.seed_everything(0)
    rows = []
    for seq in [int(s) for s in args.seqs.split(",")]:
        ours = attempt(lambda seq=seq: _ours(seq))
        t_ours = attempt(lambda ours=ours: time_ms(ours)) if ours != OOM else OOM
        m_ours = attempt(lambda ours=ours: peak_gib(ours)) if ours != OOM else OOM
        free()
        stock = attempt(lambda seq=seq: _stock(seq))
        t_stock = (
            attempt(lambda stock=stock: time_ms(stock, budget_ms=2000, min_reps=2, max_reps=5))
            if stock != OOM
            else OOM
        )
        m_stock = (
            attempt(lambda stock=stock: peak_gib(stock)) if stock != OOM and t_stock != OOM else OOM
        )
        free()
        speedup = (
            t_stock / t_ours if isinstance(t_stock, float) and isinstance(t_ours, float) else ""
        )
        rows.append([seq, t_ours, m_ours, t_stock, m_stock, speedup])
        print(rows[-1], flush=True)
    text = f"{device_line()} | commit {git_rev()}\n\n" + table(
        [
            "seq",
            "ours fwd+bwd ms",
            "ours peak GiB",
            "stock Megatron fwd+bwd ms",
            "stock peak GiB",
            "speedup",
        ],
        rows,
    )
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "dsa_layer.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
