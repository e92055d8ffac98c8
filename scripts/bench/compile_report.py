"""Compile the Triton kernels for sm_90 without a GPU and print registers / spills / shared memory.

Triton ships ptxas, so the resource report (what METHOD.md asks to read before spending device
time) is available on a CPU-only machine: ``python scripts/bench/compile_report.py``. Each
autotune config of each kernel is compiled at the production head dims; configs that exceed
Hopper's 227 KB of shared memory per block are the ones the autotuner will discard.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from indexcache_train.ops import triton_dense_attention as tda
from indexcache_train.ops import triton_indexer as tix
from indexcache_train.ops import triton_sparse_mla as tsm

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # bytes of dynamic shared memory per block on sm_90


PTR_TYPES = {
    "lse_ptr": "*fp32", "delta_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": "*fp32",
    "dkv_ptr": "*fp32", "idx_ptr": "*i32", "qi_ptr": "*i64", "ks_ptr": "*i64",
    "qblk_max_ptr": "*i32", "qblk_min_ptr": "*i32", "s_ptr": "*fp32", "ent_ptr": "*i32",
    "cnt_ptr": "*i32",
}  # fmt: skip


def _sig(fn, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = PTR_TYPES.get(name, "*bf16")
        elif name.startswith("scale") or name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _attrs(fn, constexprs: dict) -> dict:
    """What the launcher specializes at run time for production shapes: 16-byte aligned pointers
    and strides that are multiples of 16 elements (``tt.divisibility = 16``)."""
    out = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            continue
        if name.endswith("_ptr") or name.startswith("stride"):
            out[(i,)] = [["tt.divisibility", 16]]
    return out


def _resource_usage(cubin: bytes) -> tuple[str, str]:
    """Registers and spill stores from ``cuobjdump -res-usage`` (Triton bundles cuobjdump)."""
    import re
    import subprocess
    import tempfile

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        txt = subprocess.run(
            [str(tool), "-res-usage", f.name], capture_output=True, text=True
        ).stdout
    regs = re.search(r"REG:(\d+)", txt)
    stack = re.search(r"STACK:(\d+)", txt)
    return (regs.group(1) if regs else "?"), (stack.group(1) if stack else "?")


def compile_one(
    fn, constexprs: dict, num_warps: int, num_stages: int, ptr_types: dict | None = None
) -> str:
    sig = _sig(fn, constexprs)
    sig.update(ptr_types or {})
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=_attrs(fn, constexprs))
    try:
        k = triton.compile(
            src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages}
        )
    except Exception as e:
        return f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    n_regs, n_spill = _resource_usage(k.asm["cubin"])
    ptx = k.asm["ptx"]
    # ptxas -v style numbers are in the cubin metadata only after load; count from SASS text instead.
    wgmma = ptx.count("wgmma.mma_async")
    vec = ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4")
    scalar16 = ptx.count("ld.global.b16") + ptx.count("ld.global.nc.b16")
    cp_async = ptx.count("cp.async.cg") + ptx.count("cp.async.ca")
    mma = ptx.count("mma.sync")
    smem = k.metadata.shared
    flag = " OVER SMEM" if smem > SMEM_LIMIT else ""
    return f"smem={smem}{flag} wgmma={wgmma} mma.sync={mma} ld.v4={vec} ld.b16={scalar16} cp.async={cp_async} regs={n_regs} spill_bytes={n_spill}"


def main() -> None:
    jobs = []
    for cfg in tda._fwd_configs():
        for da, db, dv in ((128, 64, 128), (256, 0, 256)):
            c = dict(DA=da, DB=db, DV=dv, INTERP=False, **cfg.kwargs)
            jobs.append(("dense_fwd", tda._attn_fwd_kernel.fn, c, cfg.num_warps, cfg.num_stages))
    for cfg in tda._bwd_configs():
        for da, db, dv in ((128, 64, 128), (256, 0, 256)):
            c = dict(DA=da, DB=db, DV=dv, INTERP=False, **cfg.kwargs)
            jobs.append(("dense_dq", tda._attn_bwd_dq_kernel.fn, c, cfg.num_warps, cfg.num_stages))
            c2 = dict(c, QB=tda.QB_ROWS, NQB_P2=1024)
            jobs.append(
                ("dense_dkdv", tda._attn_bwd_dkdv_kernel.fn, c2, cfg.num_warps, cfg.num_stages)
            )
    # Sparse MLA tile shapes: 16 heads per row (GLM-5 at TP 4), 4 rows x 16 heads (row-block),
    # 64 heads per row (GLM-5 at TP 1); each config only for the tile heights it is meant for.
    for bh, bm in ((16, 1), (16, 4), (64, 1)):
        m = bh * bm
        base = dict(DA=512, DB=64, BLOCK_H=bh, BM=bm, PLAN=bm > 1, SCAN=2048, INTERP=False)
        for cfg in tsm._fwd_configs():
            if cfg.kwargs["MIN_M"] <= m <= cfg.kwargs["MAX_M"]:
                c = dict(base, **cfg.kwargs)
                jobs.append(
                    ("sparse_fwd", tsm._sparse_mla_fwd_kernel.fn, c, cfg.num_warps, cfg.num_stages)
                )
        for cfg in tsm._bwd_configs():
            if cfg.kwargs["MIN_M"] <= m <= cfg.kwargs["MAX_M"]:
                for do_dq, do_dkv in tsm.bwd_launches(m):
                    c = dict(base, DO_DQ=do_dq, DO_DKV=do_dkv, **cfg.kwargs)
                    jobs.append(
                        (
                            "sparse_bwd",
                            tsm._sparse_mla_bwd_kernel.fn,
                            c,
                            cfg.num_warps,
                            cfg.num_stages,
                        )
                    )
    for bm, bn, w, st in ((64, 128, 8, 3), (128, 128, 8, 3), (64, 256, 8, 3), (128, 64, 4, 3)):
        c = dict(NUM_HEADS=32, HEAD_DIM=128, BLOCK_M=bm, BLOCK_N=bn, INTERP=False)
        jobs.append(("indexer", tix._indexer_scores_kernel, c, w, st))
    jobs.append(("radix_topk", tix._radix_topk_kernel, dict(BLOCK=4096), 8, 1))
    only = sys.argv[1:] or None
    for name, fn, c, w, st in jobs:
        if only and name not in only:
            continue
        shown = {k: v for k, v in c.items() if k not in ("INTERP", "MIN_M", "MAX_M")}
        print(f"{name:11s} {shown} w={w} s={st}: {compile_one(fn, c, w, st)}", flush=True)


if __name__ == "__main__":
    main()
