"""Where a train step's GPU time goes: torch.profiler over one step, by kernel family.

For each cell (schedule x stage x sequence length; default the bench model, 16 heads, freq 4, one
sparse-stage and one warm-up step at 32K and 128K, chunked LM head) it runs one untimed step
(kernel compilation, autotuning), then profiles one step and prints GPU time per kernel family
(``FAMILIES``: one ordered table of name patterns) and the top-15 kernels. Kernels launched inside
a Megatron ``MoELayer`` (its forward, recompute or backward, traced through the autograd sequence
numbers) count as MoE unless they are GEMMs. ``--memory`` also records the allocator history of
the profiled step and prints the largest live allocations at its peak (or at the OOM).

    python scripts/bench/profile_step.py [--seqs 32768,131072] [--schedules freq4]
        [--stages sparse,warmup] [--memory] [--out DIR] [--set KEY=VALUE ...] [--smoke]

Works on an older package too (``PYTHONPATH=.baseline``). ``--smoke`` runs the same code on the
CPU at toy sizes (CPU ops stand in for kernels; no memory profile).
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import _cells
import torch
from _common import OOM, device_line, repo_frame, table, write_json

#: Kernel families, first match wins (regexes on CUDA kernel names; the aten names cover the CPU
#: smoke run). "MoE" is not here: it is decided by where a kernel was launched (``classify``).
FAMILIES: list[tuple[str, str]] = [
    ("NCCL", r"nccl"),
    ("sparse MLA bwd", r"sparse_mla\w*(bwd|backward|_dq|_dkv)"),
    ("sparse MLA fwd", r"sparse_mla"),
    (
        "distillation kernels",
        r"_topk_kl|_topk_probs|_dense_g_|_dense_dq|_dense_dk|_row_lse|_scale_cast|distill",
    ),
    ("indexer scores + top-k", r"_indexer_scores|radix_topk|topk|TopK|[bB]itonicSort|radixSort"),
    (
        "dense attention",
        r"_attn_fwd|_attn_bwd|cudnn|fmha|flash|sdpa|fort_native|scaled_dot_product",
    ),
    (
        "GEMMs",
        r"gemm|xmma|nvjet|cutlass|wgmma|s16816|cublas|_grouped_mm|aten::(mm|addmm|bmm|matmul|linear)$",
    ),
    ("elementwise / copies / cat / casts", r"."),
]
MOE = "MoE (router, permutation, activation)"
ORDER = [name for name, _ in FAMILIES[:-1]] + [MOE, FAMILIES[-1][0]]
_COMPILED = [(name, re.compile(p)) for name, p in FAMILIES]
_DRIVER_COPIES = re.compile(r"^(Memcpy|Memset)")  # copies the driver runs: copies
MOE_MARK = "bench::moe_layer"
BACKWARD = "autograd::engine::evaluate_function"


def classify(name: str, in_moe: bool = False) -> str:
    """The family of a kernel (or CPU op) ``name``; ``in_moe``: launched by an MoE layer."""
    if _DRIVER_COPIES.search(name):
        family = FAMILIES[-1][0]
    else:
        family = next(f for f, rx in _COMPILED if rx.search(name))
    if in_moe and family != "GEMMs":
        return MOE
    return family


class MoEScopes:
    """Forward hooks that wrap each Megatron ``MoELayer`` call in a profiler range."""

    def __init__(self, modules: Iterable[torch.nn.Module]) -> None:
        self.handles = []
        for m in modules:
            for sub in m.modules():
                if type(sub).__name__ == "MoELayer":
                    self.handles.append(sub.register_forward_pre_hook(self._enter))
                    self.handles.append(sub.register_forward_hook(self._exit))

    @staticmethod
    def _enter(module, args) -> None:
        module._bench_range = torch.profiler.record_function(MOE_MARK)
        module._bench_range.__enter__()

    @staticmethod
    def _exit(module, args, output) -> None:
        module._bench_range.__exit__(None, None, None)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _walk(event) -> tuple[str, object]:
    """Up the CPU op tree: ("moe", None) under an MoE range; ("backward", key) under the
    autograd engine's node (key: the forward op's thread and sequence number); else ("", None)."""
    e = event
    while e is not None:
        if e.name == MOE_MARK:
            return "moe", None
        if e.name.startswith(BACKWARD):
            return "backward", (e.fwd_thread, e.sequence_nr)
        e = e.cpu_parent
    return "", None


def _in_moe(event, forward_scope: dict) -> bool:
    """Launched under an MoE range, or by the backward of an op that was."""
    where, key = _walk(event)
    if where == "backward":
        return forward_scope.get(key, forward_scope.get(key[1], False))
    return where == "moe"


def _forward_scope(events: list) -> dict:
    """(thread, sequence number) of each forward op that records an autograd node -> whether it
    ran in an MoE layer (also keyed by the sequence number alone, as a fallback)."""
    scope: dict = {}
    for e in events:
        where = _walk(e)[0] if e.sequence_nr >= 0 else "backward"
        if where != "backward":
            moe = where == "moe"
            key = (e.thread, e.sequence_nr)
            scope[key] = scope.get(key, False) or moe
            scope[e.sequence_nr] = scope.get(e.sequence_nr, False) or moe
    return scope


@dataclass
class Profile:
    """GPU (or, on the CPU, op) time by kernel name and family, in ms."""

    by_kernel: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    wall_ms: float = 0.0
    device: str = "cuda"

    def add(self, name: str, ms: float, in_moe: bool) -> None:
        family = classify(name, in_moe)
        entry = self.by_kernel.setdefault((name, family), [0.0, 0])
        entry[0] += ms
        entry[1] += 1

    @property
    def total_ms(self) -> float:
        return sum(v[0] for v in self.by_kernel.values())

    def families(self) -> dict[str, float]:
        out = dict.fromkeys(ORDER, 0.0)
        for (_, family), (ms, _) in self.by_kernel.items():
            out[family] += ms
        return out

    def to_json(self, top: int = 15) -> dict:
        total = self.total_ms or 1.0
        kernels = sorted(self.by_kernel.items(), key=lambda kv: -kv[1][0])[:top]
        return {
            "device": self.device,
            "wall_ms": self.wall_ms,
            "kernel_ms": self.total_ms,
            "families": {f: {"ms": ms, "share": ms / total} for f, ms in self.families().items()},
            "top": [
                {"kernel": k, "family": f, "ms": ms, "calls": c, "share": ms / total}
                for (k, f), (ms, c) in kernels
            ],
        }


def from_events(events: list, on_cuda: bool, wall_ms: float) -> Profile:
    """Sum kernel time by name; CPU ops (self time) stand in for kernels without a GPU."""
    from torch.autograd import DeviceType

    prof = Profile(wall_ms=wall_ms, device="cuda" if on_cuda else "cpu")
    # record_function ranges (our MoE marker, the optimizer's step) also appear as device
    # events spanning the kernels inside them: counted as kernels they double the time (a GPU
    # profile once showed more kernel time than the step's wall time).
    events = [e for e in events if not getattr(e, "is_user_annotation", False)]
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    scope = _forward_scope(cpu)
    if not on_cuda:
        for e in cpu:
            if e.name != MOE_MARK and not e.name.startswith(BACKWARD) and e.self_cpu_time_total:
                prof.add(e.name, e.self_cpu_time_total / 1e3, _in_moe(e, scope))
        return prof
    attributed: dict[str, float] = defaultdict(float)
    for e in cpu:
        for k in e.kernels:
            attributed[k.name] += k.duration / 1e3
            prof.add(k.name, k.duration / 1e3, _in_moe(e, scope))
    # Device work no CPU op claims (rare): by name alone.
    device_ms: dict[str, float] = defaultdict(float)
    for e in events:
        if e.device_type == DeviceType.CUDA:
            device_ms[e.name] += (e.time_range.end - e.time_range.start) / 1e3
    for name, ms in device_ms.items():
        if ms - attributed.get(name, 0.0) > 1e-3:
            prof.add(name, ms - attributed.get(name, 0.0), False)
    return prof


def profile_one_step(built: _cells.Built) -> Profile:
    """torch.profiler over one step of ``built`` (after its untimed ones)."""
    on_cuda = built.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    scopes = MoEScopes(built.model_chunks())
    try:
        with torch.profiler.profile(activities=activities) as prof:
            _cells.synchronize(built.device)
            t0 = time.perf_counter()
            built.step()
            _cells.synchronize(built.device)
            wall_ms = 1e3 * (time.perf_counter() - t0)
    finally:
        scopes.remove()
    return from_events(list(prof.events()), on_cuda, wall_ms)


def render(title: str, pj: dict) -> str:
    """Markdown tables of a ``Profile.to_json()``: time by family, then the top kernels."""
    unit = "GPU" if pj["device"] == "cuda" else "CPU-op"
    rows = [
        [f, v["ms"], f"{100 * v['share']:.0f}%"] for f, v in pj["families"].items() if v["ms"] > 0
    ]
    top = [
        [t["kernel"][:90], t["family"], t["calls"], t["ms"], f"{100 * t['share']:.1f}%"]
        for t in pj["top"]
    ]
    return (
        f"### {title}: {unit} time {pj['kernel_ms']:.1f} ms (step wall {pj['wall_ms']:.1f} ms)\n\n"
        + table([f"{unit} time by family", "ms", "share"], rows)
        + "\n\n"
        + table(["top-15 kernels", "family", "calls", "ms", "share"], top)
    )


# ---------------------------------------------------------------------- memory at the peak
def peak_allocations(trace: list[dict], top: int = 15) -> dict:
    """Replay an allocator trace (``torch.cuda.memory._snapshot()["device_traces"][i]``): the
    live allocations at the high-water mark (or the OOM), largest first, and grouped by the
    innermost frame of this repo or Megatron that requested them."""
    live: dict[int, dict] = {}
    used = peak = 0
    at_peak: dict[int, dict] = {}
    oom = False
    request: dict | None = None  # the allocation that failed (an OOM's size and origin)
    for ev in trace:
        action = ev.get("action")
        if action == "alloc":
            live[ev["addr"]] = ev
            used += ev["size"]
            if used > peak:
                peak, at_peak = used, dict(live)
        elif action in ("free_requested", "free_completed") and ev["addr"] in live:
            used -= live.pop(ev["addr"])["size"]
        elif action == "oom":
            oom, at_peak, peak = True, dict(live), used
            request = {
                "gib": ev.get("size", 0) / _cells.GIB,
                "origin": repo_frame(ev.get("frames", [])),
            }
            break
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ev in at_peak.values():
        g = groups[repo_frame(ev.get("frames", []))]
        g[0] += ev["size"]
        g[1] += 1
    largest = sorted(at_peak.values(), key=lambda ev: -ev["size"])[:top]
    return {
        "peak_gib": peak / _cells.GIB,
        "oom": oom,
        "request": request,
        "live_at_peak": len(at_peak),
        "by_origin": [
            {"origin": o, "gib": s / _cells.GIB, "count": n}
            for o, (s, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
        ],
        "largest": [
            {"gib": ev["size"] / _cells.GIB, "origin": repo_frame(ev.get("frames", []))}
            for ev in largest
        ],
    }


def render_memory(title: str, m: dict) -> str:
    head = f"### {title}: {'OOM at' if m['oom'] else 'peak'} {m['peak_gib']:.2f} GiB allocated"
    # The trace starts with the step: what was allocated before it (weights, gradients, the
    # optimizer's state) is not in the replay's total.
    if m.get("static_gib") is not None:
        head += f" in the step, on top of {m['static_gib']:.2f} GiB held before it"
    if m.get("request"):
        head += f"; the failed request: {m['request']['gib']:.2f} GiB at {m['request']['origin']}"
    if m.get("error"):
        head += f"; the step raised {m['error']}"
    head += "\n\n"
    rows = [[o["origin"][:100], o["gib"], o["count"]] for o in m["by_origin"]]
    return head + table(["live at the peak, by origin", "GiB", "tensors"], rows)


def _memory_step(built: _cells.Built) -> dict:
    # Python frames only: symbolising C++ stacks of ~1e5 allocations takes minutes.
    _cells.free()
    static = torch.cuda.memory_allocated(built.device) / _cells.GIB
    error = None
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=2_000_000)
    try:
        try:
            built.step()
        except Exception as e:  # an OOM inside a recompute hook arrives as SystemError
            error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            print(f"memory step: {error}", flush=True)
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    out = peak_allocations(snap["device_traces"][built.device.index or 0])
    return {**out, "static_gib": static, "error": error}


# ---------------------------------------------------------------------- driver
SMOKE_BASE = [
    "+experiment=bench_glm5",
    "model=glm5_toy",
    "++model.overrides.vocab_size=50304",
    "model.num_mtp_layers=0",
    "parallel.moe_token_dispatcher_type=allgather",
]


def bench_base(smoke: bool, lm_chunk: int) -> list[str]:
    if smoke:
        return SMOKE_BASE
    return ["+experiment=bench_glm5", f"model.lm_loss_chunk={lm_chunk}"]


def run(args: argparse.Namespace) -> dict:
    base = bench_base(args.smoke, args.lm_chunk)
    device = _cells.init_runtime(base)
    out: dict = {"device": device_line(), "package": _cells.package_line()}
    print(out["device"], "|", out["package"], flush=True)
    for seq in [int(s) for s in args.seqs.split(",")]:
        for schedule in args.schedules.split(","):
            for stage in args.stages.split(","):
                cell = _cells.Cell(schedule, stage, seq, tuple(args.set))
                out[cell.name] = _cell(base, cell, device, args.memory)
                _print_cell(cell.name, out[cell.name])
                write_json(Path(args.out) / "profile.json", out)
    return out


def _cell(base: list[str], cell: _cells.Cell, device: torch.device, memory: bool) -> dict | str:
    built = None

    def go() -> dict:
        nonlocal built
        built = _cells.build(_cells.compose_cell(base, cell), cell.stage, device)
        built.step()  # compile / autotune
        res = {"profile": profile_one_step(built).to_json()}
        if memory and device.type == "cuda":
            res["memory"] = _memory_step(built)
        return res

    res = _cells.attempt(go, keep_going=True)
    if res == OOM and memory and device.type == "cuda" and built is not None:
        res = {"profile": None, "memory": _memory_step(built)}
    _cells.release(built)
    del built
    _cells.free()
    return res


def _print_cell(name: str, res: dict | str) -> None:
    if isinstance(res, str):  # OOM or ERROR
        print(f"### {name}: {res}", flush=True)
        return
    if res.get("profile"):
        print(render(name, res["profile"]), flush=True)
    if res.get("memory"):
        print(render_memory(name, res["memory"]), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _cells.add_cell_args(ap, schedules="freq4")
    ap.add_argument("--memory", action="store_true", help="allocator history at the peak")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    _cells.check_cell_args(ap, args, {"seqs": "64"})
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
