"""MoE expert compute: Megatron's ``SequentialMLP`` vs grouped GEMMs on the same routed tokens.

GLM-5 expert dims (``configs/model/glm5.yaml``: hidden 6144, ffn 2048, SwiGLU), bf16, forward +
backward of the experts alone (tokens already permuted by expert, as the dispatcher hands them
over; each token picks top-8 distinct experts uniformly at random). Three implementations on the
same weights and tokens:

* ``SequentialMLP``: Megatron's loop over local experts (two matmuls each, host sync for splits);
* ``GroupedExperts`` (``model.moe_grouped_gemm``): one ``torch._grouped_mm`` per projection,
  expert weights stacked per call;
* raw grouped GEMM: the same two ``torch._grouped_mm`` with weights stacked once (the ceiling).

Prints ms, TFLOP/s (3 x 2 x rows x 3 x hidden x ffn for forward + backward), peak memory and the
verdict of issue #21's rule: adopt grouped GEMMs when ``SequentialMLP`` costs > 10% more.

    python scripts/bench/bench_moe_experts.py [--experts 8,32] [--tokens 8192,32768] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import _cells
import torch
from _common import GIB, device_line, table, time_ms, write_json

ADOPT = 1.10  # issue #21: grouped GEMMs when SequentialMLP costs more than ~10% over them


def _experts(cls, n: int, smoke: bool):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from indexcache_train.config.compose import compose
    from indexcache_train.config.validate import resolve_model
    from indexcache_train.model.factory import ParallelSettings, transformer_config
    from indexcache_train.model.specs import EXPERT_MLP

    cfg = compose(
        [f"model={'glm5_toy' if smoke else 'glm5'}", f"++model.overrides.n_routed_experts={n}"]
    )
    model = resolve_model(cfg)
    par = ParallelSettings(params_dtype=torch.bfloat16, bf16=True, use_cpu_initialization=smoke)
    module = cls(
        n,
        transformer_config(model, par),
        EXPERT_MLP,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )
    return module, model


def routed(tokens: int, n: int, topk: int, hidden: int, device: torch.device, seed: int = 0):
    """Tokens x top-k rows grouped by expert (uniform random distinct experts per token)."""
    g = torch.Generator().manual_seed(seed)
    choice = torch.rand(tokens, n, generator=g).topk(min(topk, n), dim=1).indices
    counts = torch.bincount(choice.flatten(), minlength=n)
    rows = int(counts.sum())
    x = torch.randn(rows, hidden, generator=g).to(device, torch.bfloat16)
    probs = torch.rand(rows, generator=g).to(device)
    dout = torch.randn(rows, hidden, generator=g).to(device, torch.bfloat16)
    return x, counts, probs, dout


def raw_grouped(experts) -> Callable:
    """fc1 -> SwiGLU x probs -> fc2 through torch._grouped_mm, weights stacked once, autograd."""
    from indexcache_train.model.grouped_experts import expert_activation

    w1 = torch.stack([e.linear_fc1.weight.detach() for e in experts.local_experts]).requires_grad_()
    w2 = torch.stack([e.linear_fc2.weight.detach() for e in experts.local_experts]).requires_grad_()
    config = experts.config

    def fwd(x, counts, probs):
        offs = counts.to(x.device).cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x, w1.transpose(1, 2), offs=offs)
        act = (expert_activation(config, h) * probs.unsqueeze(-1)).to(h.dtype)
        return torch._grouped_mm(act, w2.transpose(1, 2), offs=offs), None

    return fwd


def _time(fn: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """(ms, peak GiB): CUDA events and the allocator's high-water mark; one wall-clock call on CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0), None
    ms = time_ms(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / GIB


def case(n: int, tokens: int, topk: int, device: torch.device, smoke: bool) -> dict:
    from megatron.core.transformer.moe.experts import SequentialMLP

    from indexcache_train.model.grouped_experts import GroupedExperts

    seq_mod, model = _experts(SequentialMLP, n, smoke)
    grp_mod, _ = _experts(GroupedExperts, n, smoke)
    seq_mod, grp_mod = seq_mod.to(device), grp_mod.to(device)
    grp_mod.load_state_dict(seq_mod.state_dict())
    x, counts, probs, dout = routed(tokens, n, topk, model.hidden_size, device)
    impls = {
        "SequentialMLP": seq_mod,
        "GroupedExperts": grp_mod,
        "raw grouped GEMM": raw_grouped(seq_mod),
    }
    flops = 2 * x.shape[0] * 3 * model.hidden_size * model.moe_intermediate_size
    out: dict = {
        "experts": n,
        "tokens": tokens,
        "rows": x.shape[0],
        "rows_per_expert": x.shape[0] / n,
    }
    for name, f in impls.items():
        xi = x.clone().requires_grad_()

        def fwd(f=f, xi=xi):
            with torch.no_grad():
                return f(xi, counts, probs)

        def fwd_bwd(f=f, xi=xi):
            y, _ = f(xi, counts, probs)
            y.backward(dout)

        ms_f, _ = _time(fwd, device)
        ms_fb, peak = _time(fwd_bwd, device)
        out[name] = {
            "fwd_ms": ms_f,
            "fwd_bwd_ms": ms_fb,
            "tflops": 3 * flops / ms_fb / 1e9,
            "peak_gib": peak,
        }
    out["speedup"] = out["SequentialMLP"]["fwd_bwd_ms"] / out["GroupedExperts"]["fwd_bwd_ms"]
    with torch.no_grad():  # the two modules compute the same thing (bf16 rounding apart)
        a, b = seq_mod(x, counts, probs)[0].float(), grp_mod(x, counts, probs)[0].float()
    out["rel_diff"] = float((a - b).norm() / a.norm())
    return out


def render(cases: list[dict]) -> str:
    names = ["SequentialMLP", "GroupedExperts", "raw grouped GEMM"]
    header = ["experts", "tokens (top-8)", "rows/expert"]
    for n in names:
        header += [f"{n} fwd ms", f"{n} fwd+bwd ms", f"{n} TFLOP/s"]
    header += ["Sequential / Grouped (fwd+bwd)", "output rel. diff"]
    rows = []
    for c in cases:
        r = [c["experts"], c["tokens"], c["rows_per_expert"]]
        for n in names:
            r += [c[n]["fwd_ms"], c[n]["fwd_bwd_ms"], c[n]["tflops"]]
        rows.append([*r, f"{c['speedup']:.3f}", f"{c['rel_diff']:.1e}"])
    return table(header, rows)


def verdict(cases: list[dict]) -> str:
    worst = min(c["speedup"] for c in cases)
    best = max(c["speedup"] for c in cases)
    adopt = worst > ADOPT
    decision = (
        "ADOPT grouped GEMMs (model.moe_grouped_gemm=auto)"
        if adopt
        else "keep SequentialMLP by default"
    )
    return (
        f"grouped vs SequentialMLP, forward + backward: {worst:.3f}x .. {best:.3f}x; "
        f"rule (> {ADOPT:.2f}x in every case): {decision}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", default="8,32", help="local experts per layer")
    ap.add_argument("--tokens", default="8192,32768", help="tokens routed (each to top-k experts)")
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--out", default=os.environ.get("OUT", "outputs/bench"))
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes (tests)")
    args = ap.parse_args(argv)
    if args.smoke:
        for k, v in {"experts": "4", "tokens": "64"}.items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    elif not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or pass --smoke for the CPU code path")
    device = _cells.init_runtime([f"model={'glm5_toy' if args.smoke else 'glm5'}"])
    print(device_line(), "|", _cells.package_line(), flush=True)
    cases = []
    for n in [int(v) for v in args.experts.split(",")]:
        for tokens in [int(v) for v in args.tokens.split(",")]:
            cases.append(case(n, tokens, args.topk, device, args.smoke))
            print(cases[-1], flush=True)
            _cells.free()
            write_json(
                Path(args.out) / "moe_experts.json", {"device": device_line(), "cases": cases}
            )
    text = (
        render(cases)
        + "\n\n"
        + (verdict(cases) if device.type == "cuda" else "no verdict: CPU smoke timings")
    )
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
