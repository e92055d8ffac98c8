"""``search``: training-free greedy IndexCache pattern search on LM loss (paper Algorithm 1).

    python -m indexcache_train.tools search --hf HF_DIR --target-full 20 --out runs/search
    python -m indexcache_train.tools search --model glm5_toy --seed 0 --num-layers 8 \\
        --target-full 3 [--blocks 2] --data default --batches 4 --seq 64 --out runs/search_toy

Starts from an all-Full model (a plain-DSA checkpoint, or a preset initialised from ``--seed``),
caches ``--batches`` calibration batches once (contiguous ``--seq + 1``-token windows from the
start of ``--data``: an indexed ``.bin/.idx`` prefix, or ``default`` = the bundled
``data/default/val``), and runs :func:`indexcache_train.tools.pattern_search.greedy_search`
with ``evaluate(pattern)`` = mean LM loss over those batches of the model built with that
schedule: Shared layers have no indexer module and take the all-Full weights minus their indexer
tensors; attention is sparse (the top-k reuse is what is judged), forward only, eval mode.
MTP layers are not built (they do not change the main LM loss) and stay as the checkpoint has
them.

Writes to ``--out``: ``search_log.jsonl`` (every evaluation and commit; rerunning the same command
resumes from it), ``result.json`` (the pattern, the upstream config keys
``index_topk_pattern`` / ``indexer_types`` to use it, the loss after each commit) and
``loss.png`` (all-Full loss, then the loss after each commit). Exit status 2 with the fix on
stderr for: a target outside ``[1, num_layers]``, ``--blocks`` > ``--target-full``, a checkpoint
that is not all-Full, a log from another search.

Cost: each candidate rebuilds the model and reloads the weights (fine on toys; the all-Full HF
tensors are held in memory once). A real-model path would build the all-Full model once on GPUs
(TP/PP as in training) and give the forward state a per-call "treat layer j as Shared" override,
so a candidate is one forward pass over the cached batches with no rebuild, and would spread a
step's candidates over data-parallel replicas (they are independent).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from indexcache_train.tools.pattern_search import (
    Commit,
    SearchError,
    SearchLogError,
    SearchResult,
    check_request,
    greedy_search,
)
from indexcache_train.tools.plot import (
    PlotsUnavailableError,
    loss_curve_figure,
    require_matplotlib,
    to_png,
)

LOG_NAME, RESULT_NAME, PLOT_NAME = "search_log.jsonl", "result.json", "loss.png"


class SearchRefusedError(ValueError):
    """A request the search cannot run; the message names the fix (exit status 2)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``search`` verb."""
    p = subparsers.add_parser(
        "search",
        help="training-free greedy F/S pattern search on LM loss (resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", type=Path, help="all-Full (plain DSA) HF checkpoint directory")
    src.add_argument("--model", help="model preset (e.g. glm5_toy), randomly initialised")
    p.add_argument("--seed", type=int, default=0, help="init seed with --model (default 0)")
    p.add_argument("--num-layers", type=int, help="with a toy --model: trunk layers")
    p.add_argument("--target-full", type=int, required=True, help="Full layers to keep")
    p.add_argument("--blocks", type=int, default=1, help="pipeline blocks P (default 1)")
    p.add_argument("--data", default="default", help="indexed-data prefix, or 'default'")
    p.add_argument("--batches", type=int, default=4, help="calibration batches (default 4)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per batch (default 1)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    # bfloat16: the served precision, the one the GPU kernels are tuned and tested in.
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", type=Path, required=True, help="output directory (resumed if present)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run or resume the search; 2 (reason and fix on stderr) when refused."""
    try:
        require_matplotlib()  # before any compute
        hf_config, label = _load_config(args)
        n = int(hf_config["num_hidden_layers"])
        if args.hf is not None:
            _check_all_full(hf_config, args.hf)
        check_request(n, args.target_full, args.blocks)
        for name in ("batches", "batch_size", "seq"):
            if getattr(args, name) < 1:
                raise SearchRefusedError(f"--{name.replace('_', '-')} must be >= 1.")
        batches = load_calibration_batches(args.data, args.batches, args.batch_size, args.seq)
        evaluator = _ModelEvaluator(args, hf_config, batches)
        meta = {
            "model": label,
            "seed": None if args.hf else args.seed,
            "data_sha256": _digest(batches),
            "batches": args.batches,
            "batch_size": args.batch_size,
            "seq": args.seq,
            "dtype": args.dtype,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"search: {label}, {n} layers -> {args.target_full} Full, {args.blocks} block(s)")
        start = time.perf_counter()
        result = greedy_search(
            n,
            args.target_full,
            evaluator,
            args.blocks,
            args.out / LOG_NAME,
            meta=meta,
            on_commit=lambda c: _print_commit(c, start),
        )
    except (SearchError, SearchLogError, SearchRefusedError, PlotsUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_outputs(args.out, result, args, n)
    print(
        f"pattern {result.pattern} ({result.pattern.count('F')}/{n} Full); loss "
        f"{result.baseline_loss:.5f} -> {result.losses[-1]:.5f}; {result.evaluations} "
        f"evaluation(s) this run, {result.resumed_commits} commit(s) resumed from the log"
    )
    print(f"wrote {args.out / RESULT_NAME}, {args.out / PLOT_NAME}, {args.out / LOG_NAME}")
    return 0


def _print_commit(c: Commit, start: float) -> None:
    layers = ",".join(str(f.layer) for f in c.flips)
    print(
        f"step {c.step}: layer(s) {layers} -> Shared, loss {c.loss:.5f} "
        f"({len(c.candidates)} candidates, {time.perf_counter() - start:.1f} s) {c.pattern}",
        flush=True,
    )


# ---------------------------------------------------------------------- outputs
def write_outputs(out: Path, result: SearchResult, args: argparse.Namespace, n: int) -> None:
    """``result.json`` and ``loss.png`` (the log is written as the search goes)."""
    from indexcache_train.schedule import IndexCacheSchedule

    keys = IndexCacheSchedule.from_pattern(result.pattern, n).to_hf_config()
    doc: dict[str, Any] = {
        "pattern": result.pattern,
        "num_layers": n,
        "num_full": result.pattern.count("F"),
        "target_full": args.target_full,
        "blocks": args.blocks,
        "baseline_loss": result.baseline_loss,
        "losses": result.losses,
        "steps": [
            {"step": c.step, "layers": [f.layer for f in c.flips], "loss": c.loss}
            for c in result.commits
        ],
        "config_keys": keys,
        "index_topk_pattern": result.pattern,
        "indexer_types": keys["indexer_types"],
        "note": "MTP layers are not searched; they keep the checkpoint's roles (Full).",
    }
    if args.hf is not None:
        doc["apply"] = (
            f"python -m checkpoint_tools convert-schedule --hf {args.hf} --out OUT_DIR "
            f"--pattern {result.pattern}"
        )
    (out / RESULT_NAME).write_text(json.dumps(doc, indent=2) + "\n")
    figure = loss_curve_figure(
        result.losses,
        title=f"greedy pattern search: {result.pattern.count('F')}/{n} layers Full",
        xlabel="search step (0 = all Full, then one per commit)",
        ylabel="calibration LM loss",
    )
    (out / PLOT_NAME).write_bytes(to_png(figure))


# ---------------------------------------------------------------------- config and data
def _load_config(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    if args.hf is not None:
        from checkpoint_tools.errors import CheckpointError
        from checkpoint_tools.hf_io import load_config

        if args.num_layers is not None:
            raise SearchRefusedError("--num-layers only applies to a toy --model preset.")
        try:
            return load_config(args.hf), str(args.hf.resolve())
        except CheckpointError as err:
            raise SearchRefusedError(str(err)) from None
    from indexcache_train.model.presets import PRESETS, is_toy_preset, preset_hf_config

    if args.model not in PRESETS:
        raise SearchRefusedError(
            f"--model {args.model!r} is not a preset; choose one of {sorted(PRESETS)}."
        )
    toys = sorted(p for p in PRESETS if is_toy_preset(p))
    if args.num_layers is not None and args.model not in toys:
        raise SearchRefusedError(f"--num-layers only applies to the toy presets {toys}.")
    config = _toy_config(args.model, args.num_layers) if is_toy_preset(args.model) else None
    label = f"{args.model}" + (f"[{args.num_layers} layers]" if args.num_layers else "")
    return config or preset_hf_config(args.model), label


def _toy_config(name: str, num_layers: int | None, vocab: int | None = None) -> dict[str, Any]:
    from indexcache_train.model.families import preset_owner

    family = preset_owner(name)
    assert family is not None  # callers checked is_toy_preset(name)
    kw: dict[str, Any] = dict(family.presets[name].overrides)
    if num_layers is not None:
        kw["num_hidden_layers"] = num_layers
    if vocab is not None:
        kw["vocab_size"] = vocab
    return family.toy_hf_config(0, **kw)


def load_calibration_batches(data: str, batches: int, batch_size: int, seq: int) -> list:
    """``batches`` int64 tensors ``[batch_size, seq + 1]``: contiguous windows of the token stream
    (documents in file order, EOD tokens as stored), the same every run."""
    import numpy as np
    import torch

    from indexcache_train.data.config import BUNDLED_CORPUS_DIR

    prefix = str(BUNDLED_CORPUS_DIR / "val") if data == "default" else data
    if not Path(prefix + ".bin").is_file() or not Path(prefix + ".idx").is_file():
        raise SearchRefusedError(
            f"--data {data!r}: {prefix}.bin/.idx not found. Fix: give an indexed-data prefix "
            "(python -m indexcache_train.data.preprocess) or 'default'."
        )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    need = batches * batch_size * (seq + 1)
    parts, have = [], 0
    for i in range(len(ds)):
        parts.append(np.asarray(ds[i], dtype=np.int64))
        have += len(parts[-1])
        if have >= need:
            break
    if have < need:
        raise SearchRefusedError(
            f"--data {data!r} holds {have} tokens but {batches} x {batch_size} x {seq + 1} = "
            f"{need} are needed. Fix: lower --batches/--batch-size/--seq or use more data."
        )
    stream = torch.from_numpy(np.concatenate(parts)[:need])
    return list(stream.view(batches, batch_size, seq + 1).unbind(0))


def _digest(batches: list) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(b.numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------- the model side
class _ModelEvaluator:
    """``pattern -> mean LM loss`` over the cached batches, one model build per pattern."""

    def __init__(self, args: argparse.Namespace, hf_config: dict[str, Any], batches: list) -> None:
        import torch

        from indexcache_train import compat
        from indexcache_train.tools import model_io

        self.batches = batches
        self.dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        vocab_needed = int(max(int(b.max()) for b in batches)) + 1
        use_cuda = args.device == "cuda" or (args.device == "auto" and compat.has_cuda())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        model_io.init_single_process(args.seed)
        from indexcache_train.model.presets import is_toy_preset

        if args.hf is None and is_toy_preset(args.model):
            vocab = max(int(hf_config["vocab_size"]), -(-vocab_needed // 64) * 64)
            hf_config = _toy_config(args.model, args.num_layers, vocab)
        self.hf_config = hf_config
        self.cfg = self._model_config("F" * int(hf_config["num_hidden_layers"]))
        self._check_vocab(vocab_needed)
        if args.hf is not None:
            self.weights = _read_all_full_weights(args.hf, self.cfg)
        else:
            self.weights = model_io.random_weights(hf_config, args.seed)

    def _model_config(self, pattern: str):
        from indexcache_train.tools.model_io import trunk_config

        try:
            return trunk_config(self.hf_config, pattern)
        except ValueError as err:
            raise SearchRefusedError(f"model config unsupported: {err}") from None

    def _check_vocab(self, vocab_needed: int) -> None:
        if vocab_needed > self.cfg.vocab_size:
            raise SearchRefusedError(
                f"the calibration data holds token id {vocab_needed - 1} but the model's "
                f"vocab_size is {self.cfg.vocab_size}. Fix: use data tokenised with the model's "
                "tokenizer."
            )

    def __call__(self, pattern: str) -> float:
        import torch

        from indexcache_train.model.forward_state import DistillSettings, DSAForwardState
        from indexcache_train.tools.model_io import build_loaded

        cfg = self._model_config(pattern)
        model = build_loaded(cfg, self.weights, self.dtype).to(self.device)
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in self.batches:
                batch = batch.to(self.device)
                tokens, labels = batch[:, :-1], batch[:, 1:]
                B, S = tokens.shape
                pos = torch.arange(S, device=self.device).expand(B, S)
                state = DSAForwardState(
                    cfg.schedule, pos, attention="sparse", distill=DistillSettings(mode="none")
                )
                loss_BS = model(tokens, pos, None, labels=labels, dsa_state=state)
                total += float(loss_BS.double().sum())  # .item()-like sync, once per batch
                count += loss_BS.numel()
        return total / count


def _read_all_full_weights(hf_dir: Path, cfg) -> dict:
    """Every trunk tensor of an all-Full checkpoint; refuses one whose layers lack indexers."""
    from checkpoint_tools.errors import CheckpointError
    from checkpoint_tools.hf_io import HFCheckpoint
    from indexcache_train.tools.model_io import missing_hf_tensors, read_hf_weights

    try:
        ckpt = HFCheckpoint(hf_dir)
    except CheckpointError as err:
        raise SearchRefusedError(str(err)) from None
    missing = missing_hf_tensors(ckpt.names, cfg)
    no_indexer = sorted({int(h.split(".")[2]) for h in missing if ".indexer." in h})
    if no_indexer:
        raise SearchRefusedError(
            f"{hf_dir}: layer(s) {no_indexer} have no indexer tensors (Shared already); the "
            "search starts all-Full and needs every layer's indexer. Fix: point --hf at the "
            "plain-DSA (all-Full) checkpoint this one was converted from."
        )
    if missing:
        raise SearchRefusedError(f"{hf_dir}: lacks {len(missing)} tensor(s), e.g. {missing[:3]}.")
    return read_hf_weights(ckpt, cfg)


def _check_all_full(config: dict[str, Any], hf_dir: Path) -> None:
    from indexcache_train.schedule import IndexCacheSchedule, ScheduleError

    try:
        schedule = IndexCacheSchedule.from_hf_config(config)
    except ScheduleError as err:
        raise SearchRefusedError(f"{hf_dir}/config.json: {err}") from None
    shared = [i for i in range(schedule.num_layers) if not schedule.is_full(i)]
    if shared:
        raise SearchRefusedError(
            f"{hf_dir} is an IndexCache checkpoint ({schedule.describe()}): layer(s) "
            f"{shared[:8]} are Shared and have no indexers, but the search starts all-Full. "
            "Fix: point --hf at the plain-DSA (all-Full) checkpoint it was converted from."
        )
