"""``verify``: the parity ladder for an HF checkpoint against our Megatron model.

    python -m checkpoint_tools verify --hf HF_DIR [--num-layers N] [--seq-len S] [--work-dir DIR]

* L1, exact round trip: ``import`` (one process) then ``export`` into temporary directories;
  every exported tensor must have the source's name, dtype and bits (FP8 sources: the exported
  bf16 tensor must equal the reference dequantisation ``fp8.read_dequantized``), and the exported
  name set must be exactly what the mapping table implies.
* L2, our model vs transformers (:mod:`checkpoint_tools.parity`): the imported Megatron
  checkpoint in our model against ``from_pretrained`` of the exported directory (L1 proved it
  bit-identical to the source), fp32, eager attention.

``--num-layers N`` imports, exports and compares only the first N trunk layers (no MTP): both
models are built with N layers and only those layers' tensors are read, so a real-size checkpoint
can be checked on one machine. Exit status 0 only when every check passes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from checkpoint_tools.export_megatron import export_checkpoint
from checkpoint_tools.fp8 import is_fp8, read_dequantized
from checkpoint_tools.hf_io import HFCheckpoint
from checkpoint_tools.import_megatron import plan_import, run_import
from checkpoint_tools.megatron_runtime import hide_gpus
from checkpoint_tools.parity import ParityReport, compare_with_transformers
from checkpoint_tools.safetensors_format import dtype_string
from indexcache_train.model.config import ModelConfig
from indexcache_train.model.hf_mapping import hf_tensor_names


@dataclass
class RoundTripReport:
    """L1: what the HF -> Megatron -> HF round trip changed (nothing, when it passes)."""

    compared: int = 0
    fp8_dequantized: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    #: Source tensors the model does not use (FP8 scales, dropped indexers, MTP head copies).
    not_carried: int = 0

    @property
    def passed(self) -> bool:
        return self.compared > 0 and not (self.missing or self.extra or self.mismatched)

    def table(self) -> str:
        lines = [
            f"L1 round trip HF -> Megatron -> HF: {self.compared} tensors compared "
            f"({self.fp8_dequantized} FP8 against the reference dequantisation), "
            f"{self.not_carried} source tensors not part of the model"
        ]
        for what, names in (
            ("missing", self.missing),
            ("extra", self.extra),
            ("changed", self.mismatched),
        ):
            lines += [f"  {what}: {n}" for n in names[:20]]
        lines.append(f"L1: {'PASS' if self.passed else 'FAIL'} (same names, dtypes and bits)")
        return "\n".join(lines)


def compare_round_trip(
    source: HFCheckpoint, exported: HFCheckpoint, model: ModelConfig
) -> RoundTripReport:
    """Compare every tensor of ``model`` in ``exported`` with ``source`` (one tensor at a time)."""
    expected = hf_tensor_names(model)
    report = RoundTripReport(not_carried=len(set(source.names) - set(expected)))
    report.missing = [n for n in expected if n not in exported]
    report.extra = sorted(set(exported.names) - set(expected))
    for name in expected:
        if name not in exported:
            continue
        if is_fp8(source.info(name).dtype):
            want = read_dequantized(source, name)
            report.fp8_dequantized += 1
        else:
            want = source.read_tensor(name)
        got = exported.read_tensor(name)
        report.compared += 1
        if dtype_string(got.dtype) != dtype_string(want.dtype):
            report.mismatched.append(f"{name}: dtype {got.dtype} != {want.dtype}")
        elif got.shape != want.shape or not torch.equal(_bits(got), _bits(want)):
            report.mismatched.append(f"{name}: values differ")
    return report


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@dataclass
class VerifyResult:
    """Both rungs; ``l2`` is None when it was skipped (``skip_reason`` says why)."""

    l1: RoundTripReport
    l2: ParityReport | None
    skip_reason: str | None = None

    @property
    def passed(self) -> bool:
        return self.l1.passed and (self.l2 is None or self.l2.passed)


def verify(
    hf_dir: str | os.PathLike[str],
    *,
    num_layers: int | None = None,
    seq_len: int | None = None,
    batch: int = 2,
    seed: int = 0,
    atol: float = 1e-5,
    work_dir: str | os.PathLike[str] | None = None,
    skip_l2: bool = False,
) -> VerifyResult:
    """Run L1 and L2 (see module doc); temporary checkpoints live under ``work_dir``."""
    source = HFCheckpoint(hf_dir)
    plan = plan_import(source, num_layers=num_layers)  # validates the checkpoint first
    with tempfile.TemporaryDirectory(prefix="indexcache-verify-", dir=work_dir) as tmp:
        megatron_dir, exported_dir = Path(tmp) / "megatron", Path(tmp) / "hf"
        run_import(plan, megatron_dir)
        export_checkpoint(
            megatron_dir, exported_dir, dtype=plan.dtype, allow_transformers_incompatible=True
        )
        l1 = compare_round_trip(source, HFCheckpoint(exported_dir), plan.model)
        reason = _l2_skip_reason(plan.model, skip_l2)
        if reason is not None:
            return VerifyResult(l1, None, reason)
        l2 = compare_with_transformers(
            megatron_dir, exported_dir, seq_len=seq_len, batch=batch, seed=seed, atol=atol
        )
    return VerifyResult(l1, l2)


def _l2_skip_reason(model: ModelConfig, skip: bool) -> str | None:
    if skip:
        return "--skip-l2"
    shared = any(t == "shared" for t in model.schedule.indexer_types)
    if shared and not model.family_record.supports_shared_layers:
        return f"transformers 5.17 cannot build Shared layers for {model.family}"
    return None


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register this verb's flags."""
    parser.add_argument("--hf", required=True, type=Path, help="HF checkpoint directory")
    parser.add_argument(
        "--num-layers", type=int, help="check only the first N trunk layers (no MTP)"
    )
    parser.add_argument(
        "--seq-len", type=int, help="tokens per sequence for L2 (default index_topk + 8)"
    )
    parser.add_argument("--batch", type=int, default=2, help="sequences for L2")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    parser.add_argument("--atol", type=float, default=1e-5, help="L2 tolerance (fp32)")
    parser.add_argument("--work-dir", type=Path, help="where the temporary checkpoints go")
    parser.add_argument("--skip-l2", action="store_true", help="run the round trip only")


def main(args: argparse.Namespace) -> int:
    """Print both reports; exit 0 only when every check passes."""
    hide_gpus()
    result = verify(
        args.hf,
        num_layers=args.num_layers,
        seq_len=args.seq_len,
        batch=args.batch,
        seed=args.seed,
        atol=args.atol,
        work_dir=args.work_dir,
        skip_l2=args.skip_l2,
    )
    print(result.l1.table())
    print(result.l2.table() if result.l2 is not None else f"L2: skipped ({result.skip_reason})")
    print(f"verify: {'PASS' if result.passed else 'FAIL'}")
    return 0 if result.passed else 1
