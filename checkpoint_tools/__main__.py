"""``python -m checkpoint_tools <verb> ...``: one argparse dispatcher over a table of verbs.

A verb is a module with ``add_arguments(parser)`` and ``main(args) -> int``. Adding one (``import``,
``export``, ``verify``) is one line in :data:`VERBS`; modules are imported only when their verb
runs, so a verb that needs Megatron does not slow down or break the others.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from checkpoint_tools.errors import CheckpointError
from indexcache_train.training.console import quiet_upstream_warnings

#: verb -> (module, one-line help).
VERBS: dict[str, tuple[str, str]] = {
    "convert-schedule": (
        "checkpoint_tools.convert_schedule",
        "rewrite an HF checkpoint for another IndexCache schedule (drop / add indexers)",
    ),
    "inspect": (
        "checkpoint_tools.inspect_checkpoint",
        "print the schedule, tensor counts and validation status of an HF checkpoint",
    ),
    "import": (
        "checkpoint_tools.import_megatron",
        "HF checkpoint -> Megatron torch_dist checkpoint",
    ),
    "export": (
        "checkpoint_tools.export_megatron",
        "Megatron checkpoint -> HF checkpoint, streaming",
    ),
    "verify": ("checkpoint_tools.verify", "round trip (L1) and parity with transformers (L2)"),
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``verb``'s module is imported to add its flags."""
    parser = argparse.ArgumentParser(
        prog="python -m checkpoint_tools", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (module, help_text) in VERBS.items():
        verb_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            importlib.import_module(module).add_arguments(verb_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run the verb, and turn a :class:`CheckpointError` into a message and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_upstream_warnings(int(os.environ.get("RANK", "0")))  # the verdict is not buried
    verb = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(verb if verb in VERBS else None).parse_args(argv)
    try:
        return int(importlib.import_module(VERBS[args.verb][0]).main(args))
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
