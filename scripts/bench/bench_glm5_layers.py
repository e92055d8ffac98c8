"""GLM-5-dims layers on one GPU: warm-up and sparse stage, freq 4 vs all-Full, 32K and 128K.

The slice of GLM-5 one GPU of the real layout holds: GLM-5's MLA and indexer dims and its MoE
expert dims (``configs/model/glm5.yaml``: hidden 6144, ffn 2048, shared expert, sigmoid top-8
routing), 16 query heads (one TP-4 rank's share of 64), 4 MoE layers, vocab 50304, no MTP, and as
many local experts as fit: a planner (``plan``) sizes them from memory (parameters x 18 B for bf16
weights, fp32 gradients, fp32 main weights and Adam moments; activations at the sequence length
under full recompute; printed with the measured peak and the count the measurement would allow).
The estimate has no measured margin, so with ``--experts auto`` an OOM re-runs the whole length
with ~1/4 fewer experts (twice at most): every cell of a length runs at one count.
Every token is routed (top-8 over all S tokens); at 128K that is ~1M routed rows, more than one
GPU holds, so the default routes top-2 there (a TP-4 rank's S/4 tokens x 8 rows) and says so.

Per cell: step time (median of the timed steps after one untimed), tokens/s/GPU, model TFLOP/s
and MFU (this tree's ``training/flops.py``: no recompute counted), peak memory; the freq 4
speedup over all-Full, FLOP-predicted and measured; and a profile by kernel family for the cells
named in ``--profile``. Runs the trainer's own step (``_cells``), on an older package too
(``PYTHONPATH=.baseline``). ``--smoke``: the same code on the CPU at toy sizes.

    python scripts/bench/bench_glm5_layers.py [--seqs 32768,131072] [--schedules freq4,full]
        [--stages sparse,warmup] [--layers 4] [--experts auto] [--topk 8,131072:2]
        [--profile freq4/sparse@32768,...] [--moe-grouped auto|true|false] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import _cells
import profile_step
import torch
from _common import GIB, OOM, device_line, table, write_json

BYTES_PER_PARAM = 2 + 4 + 4 + 8  # bf16 weight, fp32 grad buffer, fp32 main weight, Adam moments
SLACK_GIB = 2.0  # allocator fragmentation and small buffers
LONG = 65536  # from here on: --long-steps timed steps
#: --smoke: toy sizes on the CPU; the planner runs but a fixed expert count keeps it small.
SMOKE_DEFAULTS = {
    "seqs": "64",
    "topk": "2",
    "experts": "6",
    "mem_gib": 4.0,
    "steps": 1,
    "profile": "freq4/sparse@64",
}


@dataclass(frozen=True)
class Plan:
    """How many local experts fit at a sequence length, and why."""

    seq: int
    topk: int
    experts: int
    fixed_gib: float
    """Everything but the routed experts (weights, grads, Adam state)."""
    per_expert_gib: float
    """One more expert in every MoE layer."""
    activation_gib: float
    budget_gib: float
    fits: bool


def _slice_overrides(smoke: bool, layers: int, experts: int, topk: int) -> list[str]:
    o = {
        "num_hidden_layers": layers,
        "first_k_dense_replace": 0,
        "n_routed_experts": experts,
        "num_experts_per_tok": topk,
        "vocab_size": 50304,
    }
    if not smoke:
        o.update(num_attention_heads=16, num_key_value_heads=16)
    return [f"++model.overrides.{k}={v}" for k, v in o.items()]


def base_overrides(args: argparse.Namespace, experts: int, topk: int) -> list[str]:
    base = ["+experiment=bench_glm5", f"model={'glm5_toy' if args.smoke else 'glm5'}"]
    base += ["model.num_mtp_layers=0", f"model.lm_loss_chunk={args.lm_chunk}"]
    base += _slice_overrides(args.smoke, args.layers, experts, topk)
    if args.smoke:
        base.append("parallel.moe_token_dispatcher_type=allgather")  # alltoall needs CUDA
    if args.moe_grouped:
        base.append(f"model.moe_grouped_gemm={args.moe_grouped}")
    return base


def param_counts(base: list[str], experts: int) -> tuple[float, float]:
    """(parameters other than routed experts, parameters of one expert in every MoE layer),
    from the model built on the meta device (all layers Full: the larger schedule)."""
    from indexcache_train.config.validate import validate
    from indexcache_train.training.model_setup import build_chunks

    cfg = _cells.compose_cell(base, _cells.Cell("full", "sparse", 4096))
    resolved = validate(cfg, 1)
    with torch.device("meta"):
        chunks, _ = build_chunks(cfg, resolved.model, None, torch.device("meta"))
    total = sum(p.numel() for c in chunks for p in c.parameters())
    routed = sum(
        p.numel() for c in chunks for n, p in c.named_parameters() if ".local_experts." in n
    )
    return total - routed, routed / experts


def activation_gib(m, seq: int, topk: int, layers: int, lm_chunk: int) -> float:
    """Activation memory of a sparse-stage step under full recompute (one layer at a time).

    Layer inputs are kept for every layer; the recomputed layer holds its saved tensors and, in
    its backward, gradients of the same size (2x): attention (norms, q latent, q, absorbed q, kv
    latent, output, un-absorbed output), top-k indices of two live Full layers, the shared
    expert per token and the routed experts per routed row (input, fc1, act, output); plus the
    LM head's fp32 logits chunk and its gradient."""
    h, H = m.hidden_size, m.num_attention_heads
    absorbed = m.kv_lora_rank + m.qk_rope_head_dim
    attn = 2 * h + m.q_lora_rank + H * m.qk_head_dim + absorbed + H * absorbed
    attn += H * m.kv_lora_rank + H * m.v_head_dim
    mlp_row = 2 * h + 3 * m.moe_intermediate_size
    per_token = 2 * 2 * (attn + mlp_row * (topk + m.n_shared_experts))
    per_token += 2 * 4 * m.index_topk + 2 * 2 * m.index_n_heads * m.index_head_dim
    lm = 2 * min(lm_chunk or seq, seq) * m.vocab_size * 4
    return (layers * seq * h * 2 + seq * per_token + lm) / GIB + SLACK_GIB


def plan(args: argparse.Namespace, seq: int, topk: int, budget_gib: float) -> Plan:
    from indexcache_train.config.validate import resolve_model

    probe = max(topk, 8)
    base = base_overrides(args, probe, topk)
    fixed, per_expert = param_counts(base, probe)
    model = resolve_model(_cells.compose_cell(base, _cells.Cell("full", "sparse", seq)))
    act = activation_gib(model, seq, topk, args.layers, args.lm_chunk)
    fixed_gib = fixed * BYTES_PER_PARAM / GIB
    per_gib = per_expert * BYTES_PER_PARAM / GIB
    n = int((budget_gib - act - fixed_gib) // per_gib)
    return Plan(seq, topk, max(n, topk), fixed_gib, per_gib, act, budget_gib, n >= topk)


def topk_for(spec: str, seq: int) -> int:
    """``--topk``: a default, then SEQ:K exceptions (``8,131072:2``)."""
    default, special = None, {}
    for part in spec.split(","):
        if ":" in part:
            s, k = part.split(":")
            special[int(s)] = int(k)
        else:
            default = int(part)
    if default is None:
        raise ValueError(f"--topk {spec!r} needs a default top-k, e.g. 8,131072:2")
    return special.get(seq, default)


# ---------------------------------------------------------------------- cells
def run_cell(base, cell, device, flops, untimed: int, timed: int, profile: bool) -> dict | str:
    built = None

    def go() -> dict:
        nonlocal built
        built = _cells.build(_cells.compose_cell(base, cell), cell.stage, device)
        res = _cells.measure(built, _cells.timed_steps(built, untimed, timed), flops)
        if profile:
            res["profile"] = profile_step.profile_one_step(built).to_json()
        return res

    t0 = time.perf_counter()
    res = _cells.attempt(go, keep_going=True)
    _cells.release(built)
    del built
    _cells.free()
    if isinstance(res, dict):
        res["cell_s"] = time.perf_counter() - t0
    return res


def run(args: argparse.Namespace) -> dict:
    device = _cells.init_runtime(base_overrides(args, 8, 8))
    flops = _cells.load_flops()
    total = (
        torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else 0
    )
    budget = args.mem_gib or 0.92 * total
    out: dict = {"device": device_line(), "package": _cells.package_line(), "cells": {}}
    out["plans"] = {}
    print(out["device"], "|", out["package"], flush=True)
    deadline = time.perf_counter() + args.budget_s
    for seq in [int(s) for s in args.seqs.split(",")]:
        topk = topk_for(args.topk, seq)
        p = plan(args, seq, topk, budget)
        auto = args.experts == "auto"
        experts = p.experts if auto else int(args.experts)
        tried: list[int] = []
        while True:
            print(_plan_line(p, experts), flush=True)
            tried.append(experts)
            out["plans"][seq] = {**asdict(p), "experts_used": experts, "experts_tried": tried}
            # The planner's activation estimate has no measured margin: with auto experts an OOM
            # backs off and re-runs the length, so freq 4 and all-Full compare at one count.
            fewer = backoff(experts, topk)
            retry = auto and p.fits and fewer is not None and len(tried) <= BACKOFFS
            oom = run_length(args, seq, topk, experts, (device, flops, deadline), out, retry)
            if not (oom and retry):
                break
            print(f"@{seq}: OOM with {experts} local experts: again with {fewer}", flush=True)
            experts = fewer
    return out


#: --experts auto: re-runs of a length after an OOM, each with ~1/4 fewer local experts.
BACKOFFS = 2


def backoff(experts: int, topk: int) -> int | None:
    """The next, smaller local expert count after an OOM (None: none left above top-k)."""
    fewer = max(topk, experts - max(1, experts // 4))
    return fewer if fewer < experts else None


def run_length(args, seq, topk, experts, ctx, out, stop_on_oom: bool) -> bool:
    """Every cell at one length with ``experts`` local experts into ``out["cells"]``; True when
    one ran out of memory (``stop_on_oom``: the rest of the length is not run)."""
    device, flops, deadline = ctx
    base = base_overrides(args, experts, topk)
    timed = args.long_steps if seq >= LONG else args.steps
    profiled = set(args.profile.split(",")) if args.profile else set()
    oom = False
    for stage in args.stages.split(","):
        for schedule in args.schedules.split(","):
            cell = _cells.Cell(schedule, stage, seq)
            if time.perf_counter() > deadline:
                res: dict | str = f"skipped (past --budget-s {args.budget_s:.0f})"
            elif oom and (stop_on_oom or stage == "sparse"):
                res = "skipped (a cell at this length ran out of memory)"
            else:
                res = run_cell(base, cell, device, flops, 1, timed, cell.name in profiled)
                oom |= res == OOM
            if isinstance(res, dict):
                res.update(experts=experts, topk=topk, layers=args.layers)
            out["cells"][cell.name] = res
            print(cell.name, _short(res), flush=True)
            write_json(Path(args.out) / "glm5_layers.json", out)
    return oom


def _plan_line(p: Plan, used: int) -> str:
    verdict = "fits" if p.fits else "over budget even at the minimum: expect OOM"
    return (
        f"plan @{p.seq}: top-{p.topk}, {used} local experts per layer (planner {p.experts}, "
        f"{verdict}); fixed {p.fixed_gib:.1f} GiB + {p.per_expert_gib:.2f} GiB/expert + "
        f"activations ~{p.activation_gib:.1f} GiB <= budget {p.budget_gib:.1f} GiB"
    )


def _short(res: dict | str) -> str:
    if not isinstance(res, dict):
        return res
    keys = ("step_s", "tokens_per_s", "tflops", "mfu", "peak_gib")
    return " ".join(f"{k}={res.get(k)}" for k in keys)


# ---------------------------------------------------------------------- report
def render(out: dict, profiles: bool = True) -> str:
    rows, speed = [], []
    cells = out["cells"]
    for name, r in cells.items():
        if not isinstance(r, dict):
            rows.append([name] + [r] + [""] * 11)
            continue
        seq = int(name.split("@")[1])
        plan_ = out["plans"][seq] if seq in out["plans"] else out["plans"][str(seq)]
        act = r["peak_gib"] - r["steady_gib"] if "peak_gib" in r else None
        fit = None
        if "peak_gib" in r and name.split("/")[1].startswith("sparse"):
            spare = plan_["budget_gib"] - r["peak_gib"]
            fit = r["experts"] + int(spare // plan_["per_expert_gib"])
        rows.append(
            [
                name,
                r["experts"],
                r["topk"],
                r["step_s"],
                r["tokens_per_s"],
                r["tflops"],
                None if r["mfu"] is None else 100 * r["mfu"],
                r.get("peak_gib"),
                plan_["activation_gib"],
                act,
                fit,
                r["flops"] / 1e12,
                r["flops_indexer"] / 1e12,
            ]
        )
    for name, r in cells.items():
        base = cells.get(name.replace("freq4/", "full/"))
        if name.startswith("freq4/") and isinstance(r, dict) and isinstance(base, dict):
            p, m = base["flops"] / r["flops"], base["step_s"] / r["step_s"]
            speed.append([name.replace("freq4/", ""), p, m, m / p])
    header = [
        "cell",
        "experts",
        "top-k",
        "step s",
        "tokens/s/GPU",
        "TFLOP/s",
        "MFU %",
        "peak GiB",
        "planned act. GiB",
        "measured act. GiB",
        "experts that fit (measured)",
        "model TFLOP/step",
        "indexer TFLOP/step",
    ]
    text = table(header, [["" if v is None else v for v in row] for row in rows])
    if speed:
        text += "\n\n" + table(
            ["stage@seq", "freq4 speedup FLOP-predicted", "measured", "measured / predicted"],
            [[s[0], f"{s[1]:.3f}", f"{s[2]:.3f}", f"{s[3]:.3f}"] for s in speed],
        )
    for name, r in cells.items():
        if profiles and isinstance(r, dict) and r.get("profile"):
            text += "\n\n" + profile_step.render(name, r["profile"])
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _cells.add_cell_args(ap, schedules="freq4,full")
    ap.add_argument("--layers", type=int, default=4, help="MoE layers (4-8)")
    ap.add_argument("--experts", default="auto", help="local experts per layer; auto: planner")
    ap.add_argument("--topk", default="8,131072:2", help="routed top-k; SEQ:K per length")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per cell (< 64K)")
    ap.add_argument("--long-steps", type=int, default=1, help="timed steps per cell (>= 64K)")
    ap.add_argument("--mem-gib", type=float, default=0.0, help="planner budget (0: 92%% of GPU)")
    ap.add_argument(
        "--profile",
        default="freq4/sparse@32768,freq4/warmup@32768",
        help="cells to profile by kernel family (one extra step each); empty: none",
    )
    ap.add_argument(
        "--moe-grouped", choices=["auto", "true", "false"], help="model.moe_grouped_gemm"
    )
    ap.add_argument("--budget-s", type=float, default=150.0, help="start no cell after this")
    ap.add_argument(
        "--render", type=Path, help="print the tables of a saved glm5_layers.json (no profiles)"
    )
    args = ap.parse_args(argv)
    if args.render:
        import json

        print(render(json.loads(args.render.read_text()), profiles=False))
        return 0
    _check(ap, args)
    out = run(args)
    text = render(out)
    print(f"\n{out['device']} | {out['package']}\n\n{text}")
    return 0


def _check(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad input before any compute."""

    def own() -> None:
        try:
            topks = [topk_for(args.topk, int(s)) for s in args.seqs.split(",")]
        except ValueError as e:
            ap.error(f"--topk / --seqs: {e}")
        if args.experts != "auto" and not args.experts.isdigit():
            ap.error(f"--experts {args.experts!r}: a number or auto")
        # A token routes to top-k distinct experts: fewer local experts fail inside the router's
        # torch.topk at the first cell (the H100 run at --experts 6 with GLM-5's top-8).
        if args.experts != "auto" and int(args.experts) < max(topks):
            ap.error(
                f"--experts {args.experts} is below the routed top-k {max(topks)} (--topk "
                f"{args.topk}): use --experts >= {max(topks)}, or a smaller --topk"
            )

    _cells.check_cell_args(ap, args, SMOKE_DEFAULTS, then=own)
    if args.moe_grouped and not _cells.has_config_field("model", "moe_grouped_gemm"):
        ap.error("--moe-grouped: the imported package has no model.moe_grouped_gemm (older tree)")


if __name__ == "__main__":
    raise SystemExit(main())
