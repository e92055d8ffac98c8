"""L2 of the parity ladder: our Megatron model against transformers on the same weights.

Our side is the Megatron checkpoint loaded with ``dist_checkpointing.load`` into an fp32 TP=1
model (PyTorch reference kernels); the transformers side is ``from_pretrained`` of an HF directory
in fp32 with eager attention. Both see the same random token ids. Reported per trunk layer: the
hidden-state difference after the layer and how many query rows selected the same top-k *set*;
then logits max / mean abs difference, cosine and argmax agreement.

Top-k: HF scatters its selection into a mask, so rows with fewer than ``index_topk`` earlier keys
pad with indices of masked (future) keys; ours pad with -1. Sets are compared over valid causal
keys (``0 <= t <= row``). GLM's decoder layer returns the top-k it attended (own or reused);
DeepSeek-V3.2's indexer returns it (every DeepSeek layer is Full in transformers 5.17); the
family record's ``topk_output`` says which.

Thresholds (``docs/checkpoints.md``): logits max abs <= ``atol`` (1e-5), every layer's hidden
states within ``atol`` relative to ``max(1, max |h|)``, and identical top-k sets in every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from checkpoint_tools.megatron_dir import read_model_config
from checkpoint_tools.megatron_runtime import ParallelLayout, build_stage, init_parallel
from indexcache_train.model.config import ModelConfig
from indexcache_train.model.forward_state import DSAForwardState


@dataclass(frozen=True)
class LayerRow:
    """One trunk layer's agreement."""

    layer: int
    role: str
    max_abs: float
    ref_max_abs: float
    cosine: float
    topk_equal: int
    topk_rows: int

    @property
    def rel(self) -> float:
        return self.max_abs / max(1.0, self.ref_max_abs)


@dataclass
class ParityReport:
    """Everything L2 measured; :attr:`passed` applies the thresholds."""

    architecture: str
    batch: int
    seq_len: int
    atol: float
    rows: list[LayerRow] = field(default_factory=list)
    logits_max_abs: float = float("nan")
    logits_mean_abs: float = float("nan")
    logits_cosine: float = float("nan")
    argmax_equal: int = 0
    loading_issues: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (
            not self.loading_issues
            and self.logits_max_abs <= self.atol
            and all(r.rel <= self.atol and r.topk_equal == r.topk_rows for r in self.rows)
        )

    def table(self) -> str:
        lines = [
            f"L2 vs transformers {self.architecture} (fp32, eager; batch {self.batch} x seq "
            f"{self.seq_len})",
            "layer  role    max|dh|    max|h|     cosine       top-k rows equal",
        ]
        for r in self.rows:
            lines.append(
                f"{r.layer:5d}  {r.role:6s} {r.max_abs:9.2e}  {r.ref_max_abs:9.2e}  "
                f"{r.cosine:.9f}  {r.topk_equal}/{r.topk_rows}"
            )
        rows = self.batch * self.seq_len
        lines.append(
            f"logits: max|d| {self.logits_max_abs:.2e}  mean|d| {self.logits_mean_abs:.2e}  "
            f"cosine {self.logits_cosine:.9f}  argmax {self.argmax_equal}/{rows}"
        )
        lines += [f"loading: {issue}" for issue in self.loading_issues]
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(
            f"L2: {verdict} (logits max|d| <= {self.atol:g}, hidden max|dh| <= {self.atol:g} x "
            "max(1, max|h|), identical top-k sets)"
        )
        return "\n".join(lines)


def compare_with_transformers(
    megatron_dir: str | Path,
    hf_dir: str | Path,
    *,
    seq_len: int | None = None,
    batch: int = 2,
    seed: int = 0,
    atol: float = 1e-5,
) -> ParityReport:
    """Run both models on the same tokens and measure their agreement (see module doc)."""
    _, model_cfg = read_model_config(megatron_dir)
    cfg = _without_mtp(model_cfg)
    seq_len = seq_len or min(cfg.index_topk + 8, cfg.max_position_embeddings)
    ours = _load_ours(cfg, megatron_dir)
    theirs, issues = _load_transformers(hf_dir, cfg)
    ids = torch.randint(
        0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed)
    )
    positions = torch.arange(seq_len).expand(batch, seq_len)
    ref_hidden, ref_topk = _capture_transformers(theirs, cfg)
    our_hidden = _capture_ours(ours)
    with torch.no_grad():
        ref_logits = theirs(ids).logits
        state = DSAForwardState(cfg.schedule, positions, attention="sparse", captured_topk={})
        logits = ours(ids, positions, None, dsa_state=state)
    report = ParityReport(type(theirs).__name__, batch, seq_len, atol, loading_issues=issues)
    for layer in range(cfg.num_layers):
        mine, ref = our_hidden[layer].transpose(0, 1), ref_hidden[layer]
        ours_sets = _topk_sets(state.captured_topk[layer], causal=False)
        ref_sets = _topk_sets(ref_topk[layer], causal=True)
        report.rows.append(
            LayerRow(
                layer,
                "F" if cfg.schedule.is_full(layer) else f"S<-{cfg.schedule.source(layer)}",
                (mine - ref).abs().max().item(),
                ref.abs().max().item(),
                _cosine(mine, ref),
                sum(a == b for a, b in zip(ours_sets, ref_sets)),
                len(ref_sets),
            )
        )
    diff = (logits - ref_logits).abs()
    report.logits_max_abs, report.logits_mean_abs = diff.max().item(), diff.mean().item()
    report.logits_cosine = _cosine(logits, ref_logits)
    report.argmax_equal = int((logits.argmax(-1) == ref_logits.argmax(-1)).sum().item())
    return report


def _without_mtp(cfg: ModelConfig) -> ModelConfig:
    """The trunk only: L2 compares what transformers models (it has no MTP module)."""
    return replace(
        cfg, num_nextn_predict_layers=0, schedule=replace(cfg.schedule, mtp_indexer_types=())
    )


def _load_ours(cfg: ModelConfig, megatron_dir: str | Path) -> torch.nn.Module:
    from megatron.core import dist_checkpointing

    layout = ParallelLayout()
    init_parallel(layout)
    # PyTorch reference kernels: L2 checks weights and model code, not kernel numerics.
    model = build_stage(cfg, layout, torch.float32, kernel_backend="torch")
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(megatron_dir)))
    return model.eval()


def _load_transformers(hf_dir: str | Path, cfg: ModelConfig) -> tuple[Any, list[str]]:
    cls = cfg.family_record.hf_model_class()
    model, info = cls.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    issues = [f"missing {k}" for k in info["missing_keys"]]
    # transformers ignores MTP weights only at the released depth (layer 78 / 61): ours are
    # reported as unexpected and are the only keys allowed to be.
    mtp = tuple(f"model.layers.{cfg.num_layers + k}." for k in range(8))
    issues += [f"unexpected {k}" for k in info["unexpected_keys"] if not k.startswith(mtp)]
    issues += [f"mismatched {k}" for k in info.get("mismatched_keys", [])]
    return model.eval(), issues


def _capture_transformers(model: Any, cfg: ModelConfig) -> tuple[dict[int, Any], dict[int, Any]]:
    hidden: dict[int, torch.Tensor] = {}
    topk: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):

        def keep(mod: Any, args: Any, out: Any, i: int = i) -> None:
            hidden[i] = out[0] if isinstance(out, tuple) else out
            if isinstance(out, tuple) and len(out) > 1:  # GLM: (hidden, top-k attended)
                topk[i] = out[1]

        layer.register_forward_hook(keep)
        if cfg.family_record.topk_output == "indexer":
            layer.self_attn.indexer.register_forward_hook(
                lambda mod, args, out, i=i: topk.__setitem__(i, out)
            )
    return hidden, topk


def _capture_ours(model: Any) -> dict[int, torch.Tensor]:
    hidden: dict[int, torch.Tensor] = {}
    for layer in model.decoder.layers:
        layer.register_forward_hook(
            lambda mod, args, out: hidden.__setitem__(mod.layer_number - 1, out[0])
        )
    return hidden


def _topk_sets(idx_BSK: torch.Tensor, causal: bool) -> list[frozenset[int]]:
    """One set per (batch, row): valid selected keys (>= 0; <= row for HF's padded slots)."""
    out = []
    for rows in idx_BSK.tolist():
        for s, row in enumerate(rows):
            out.append(frozenset(t for t in row if t >= 0 and (not causal or t <= s)))
    return out


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(
        a.reshape(-1).double(), b.reshape(-1).double(), dim=0
    ).item()
