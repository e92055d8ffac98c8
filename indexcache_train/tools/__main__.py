"""``python -m indexcache_train.tools VERB ...``: the tools' argparse dispatcher.

To add a verb (overlap, search, serve-config, eval, ...): write ``indexcache_train/tools/
<verb>_cli.py`` with ``add_parser(subparsers)``, which registers the verb and sets ``func``
(``args -> exit status``), and list the module in ``_VERBS``. Keep heavy imports (torch,
Megatron) inside ``func`` so ``--help`` and the light verbs stay fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from indexcache_train.tools import (
    eval_cli,
    layout_cli,
    overlap_cli,
    search_cli,
    serve_config_cli,
)

_VERBS = (layout_cli, overlap_cli, serve_config_cli, search_cli, eval_cli)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subcommand per module in ``_VERBS``."""
    parser = argparse.ArgumentParser(
        prog="python -m indexcache_train.tools",
        description="indexcache-train command-line tools.",
    )
    subparsers = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for module in _VERBS:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the verb; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
