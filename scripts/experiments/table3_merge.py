"""Merge the reports of several Table-3 calls on one base (issue #24) into one table and plots.

One 600 s device call holds a base-only call or about a dozen short arm jobs; longer arms or more
seeds need several calls on the same warm device (``--reuse-base``, disjoint ``--seeds`` /
``--arms`` per call). Each call returns its ``results.json``; this merges their runs on this
machine (no GPU, no model):

    python scripts/experiments/table3_merge.py --out OUT CALL_B_OUT CALL_C_OUT [...]

Refused before anything is written: a directory without ``results.json``; calls on different
bases (fingerprint), with different arm steps or a different evaluation (their numbers would not
be comparable); a run finished in two calls (give each call its own seeds). ``OUT`` gets
``results.json``, ``table.md`` and the two PNGs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from table3_report import render_markdown, summarize, write_plots

from indexcache_train.tools.model_io import write_atomic

#: Sizing fields two calls must share for their arms to be one experiment.
SAME_STEPS = ("warmup", "sparse")


class MergeError(ValueError):
    """Reports that cannot be merged; the message names the directory and the fix."""


def load(dirs: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for d in dirs:
        path = d / "results.json"
        if not path.is_file():
            raise MergeError(f"{d}: no results.json (pass the --out directory of a table3 call)")
        try:
            docs.append((d, json.loads(path.read_text())))
        except json.JSONDecodeError as err:
            raise MergeError(f"{path}: not JSON ({err})") from None
    return docs


def _check_same(docs: list[tuple[Path, dict[str, Any]]], what: str, get) -> None:
    first_dir, first = docs[0]
    for d, doc in docs[1:]:
        if get(doc) != get(first):
            raise MergeError(
                f"{d} and {first_dir} differ in {what} ({get(doc)!r} vs {get(first)!r}): only "
                "calls on one base with one arm recipe and evaluation can be merged"
            )


def merge(docs: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    """One results document from several calls' (checked, see the module docstring)."""
    if len(docs) < 2:
        raise MergeError("give at least two call directories to merge")
    for d, doc in docs:
        if not doc.get("base_fingerprint"):
            raise MergeError(f"{d}: the report has no base fingerprint (a call before e51deff?)")
    _check_same(docs, "base fingerprint", lambda doc: doc["base_fingerprint"])
    _check_same(docs, "evaluation", lambda doc: (doc.get("plan") or {}).get("eval"))
    with_arms = [(d, doc) for d, doc in docs if (doc.get("sizing") or {}).get("sparse")]
    if with_arms:
        _check_same(
            with_arms, "arm steps", lambda doc: tuple(doc["sizing"].get(k) for k in SAME_STEPS)
        )
    runs: dict[str, dict[str, Any]] = {}
    where: dict[str, Path] = {}
    for d, doc in docs:
        for name, run in doc.get("runs", {}).items():
            if name in runs and run.get("status") == "done" and runs[name].get("status") == "done":
                if name == "base":  # every call reports the base it reused
                    continue
                raise MergeError(
                    f"run {name} finished in both {where[name]} and {d}: give each call its "
                    "own --seeds / --arms"
                )
            if name not in runs or run.get("status") == "done":
                runs[name], where[name] = run, d
    template = (with_arms or docs)[0][1]
    merged = {k: v for k, v in template.items() if k not in ("runs", "phases", "summary")}
    merged.update(
        status="merged",
        runs=runs,
        merged_from=[str(d) for d, _ in docs],
        wall_s=sum(doc.get("wall_s") or 0 for _, doc in docs),
        budget_s=sum(doc.get("budget_s") or 0 for _, doc in docs),
        notes=[
            "merged from " + ", ".join(str(d) for d, _ in docs),
            *(f"{d.name}: {n}" for d, doc in docs for n in doc.get("notes", [])),
        ],
        summary=summarize(runs),
    )
    for key in ("reference", "base_quality", "hf_check", "search"):
        merged[key] = next((doc[key] for _, doc in docs if doc.get(key)), None)
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="the --out directories of the calls")
    ap.add_argument("--out", type=Path, required=True, help="directory for the merged report")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib)")
    args = ap.parse_args(argv)
    try:
        merged = merge(load(args.dirs))
    except MergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(
        args.out / "results.json", (json.dumps(merged, indent=1, default=str) + "\n").encode()
    )
    write_atomic(args.out / "table.md", render_markdown(merged).encode())
    if not args.no_plots:
        write_plots(merged, merged["runs"], args.out)
    print(render_markdown(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
