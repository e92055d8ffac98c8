"""``inspect``: schedule, tensor counts and validation status of an HF checkpoint (headers only)."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from checkpoint_tools.hf_io import HFCheckpoint
from checkpoint_tools.layout import is_indexer_tensor, layer_of
from checkpoint_tools.validation import ValidationReport, validate_hf_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register this verb's flags."""
    parser.add_argument("--hf", required=True, type=Path, help="HF checkpoint directory")
    parser.add_argument("--layers", action="store_true", help="one line per layer")


def describe(ckpt: HFCheckpoint, report: ValidationReport, per_layer: bool = False) -> str:
    """The text ``inspect`` prints."""
    names = ckpt.names
    layers = Counter(layer_of(n) for n in names if layer_of(n) is not None)
    indexer = Counter(layer_of(n) for n in names if is_indexer_tensor(n))
    lines = [
        report.summary(),
        f"tensors: {len(names)} total, {sum(layers.values())} in {len(layers)} layers, "
        f"{sum(indexer.values())} indexer tensors on {len(indexer)} layers",
    ]
    if per_layer:
        schedule = report.schedule
        for layer in sorted(layers):
            role = "-"
            if schedule is not None and layer < len(schedule.all_types):
                role = "F" if schedule.is_full(layer) else f"S<-{schedule.source(layer)}"
            mtp = "  (MTP)" if layer >= int(ckpt.config["num_hidden_layers"]) else ""
            lines.append(
                f"  layer {layer:3d}: {role:7s} {layers[layer]:4d} tensors, "
                f"{indexer[layer]} indexer{mtp}"
            )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Print the description; exit 1 when validation found problems."""
    ckpt = HFCheckpoint(args.hf)
    report = validate_hf_checkpoint(ckpt)
    print(describe(ckpt, report, args.layers))
    return 0 if report.ok else 1
