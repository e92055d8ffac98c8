"""``eval``: long-context evaluation of checkpoints / IndexCache schedules, compared in one table.

    python -m indexcache_train.tools eval --ckpt full=GLM5_DIR --ckpt freq4=GLM5_FREQ4_DIR \\
        --data default --seq 32768 --docs 17 --out runs/eval
    python -m indexcache_train.tools eval --model a=glm5_toy --model b=glm5_toy --pattern b=FSFS \\
        --seed 0 --data PREFIX --seq 64 --docs 2 --tokenizer none --out /tmp/eval

Each checkpoint (``--ckpt NAME=HF_DIR``, or ``--model [NAME=]PRESET`` with random weights from
``--seed``) runs with its own schedule, or the F/S pattern given by ``--pattern NAME=PATTERN``
(every Full layer of it needs indexer weights), sparse attention, no MTP layers. Measured:

* held-out loss by position bucket: the first ``--docs`` documents of ``--data`` with at least
  ``--min-doc-tokens`` tokens, each cut to ``--seq + 1`` tokens and run alone; a row's bucket is
  its context length within the document (``--buckets`` edges);
* probes built offline from token ids (``--tokenizer``; ``none`` = synthetic ids for toys),
  ``--seq + 1`` tokens each, scored teacher-forced: passkey (key at ``--passkey-depths``; exact
  greedy match of the key) and copy-at-distance (a random span repeated ``--copy-distances``
  later; token accuracy on the second copy);
* Shared-layer recall on the documents: the fraction of each Shared layer's own top-k keys (by
  head-summed attention over all keys) that are in the top-k it reuses
  (:mod:`indexcache_train.loss.recall`).

Writes ``results.json`` and ``results.md`` (rows: checkpoints) to ``--out``, each to a temporary
name then renamed. Math: :mod:`indexcache_train.tools.long_eval`. Every input is checked before
any model runs; a refused input exits 2 with the fix on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from indexcache_train.tools.long_eval import (
    DEFAULT_EDGES,
    Probe,
    ProbeError,
    ProbeVocab,
    bucket_labels,
    bucket_sums,
    copy_probe,
    default_copy_distances,
    document_rows,
    parse_edges,
    passkey_probe,
    score_probe,
    token_scores,
)

_OUTPUTS = ("results.json", "results.md")


class EvalError(RuntimeError):
    """A refused input; the message says why and what to do (exit status 2)."""


@dataclass
class Source:
    """One row of the table: a checkpoint (or preset) under one schedule."""

    name: str
    kind: str  # "hf" | "preset"
    where: str  # HF directory or preset name
    pattern: str | None = None
    hf_config: dict[str, Any] = field(default_factory=dict)
    cfg: Any = None
    ckpt: Any = None  # HFCheckpoint for kind "hf"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``eval`` verb."""
    p = subparsers.add_parser(
        "eval",
        help="long-context eval: loss by position bucket, passkey/copy probes, Shared recall",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", action="append", default=[], metavar="NAME=HF_DIR")
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]PRESET")
    p.add_argument("--pattern", action="append", default=[], metavar="NAME=PATTERN")
    p.add_argument("--seed", type=int, default=0, help="random weights of --model; probes")
    p.add_argument("--data", default="default", help="indexed dataset prefix, or 'default'")
    p.add_argument("--seq", type=int, required=True, help="tokens per forward (window - 1)")
    p.add_argument("--docs", type=int, default=17, help="documents to score (0: probes only)")
    p.add_argument("--min-doc-tokens", type=int, help="shortest document used (default seq+1)")
    p.add_argument(
        "--buckets", default=",".join(map(str, DEFAULT_EDGES)), help="edges, e.g. 0,1K,4K"
    )
    p.add_argument("--probes", default="passkey,copy", help="comma list of passkey, copy; or none")
    p.add_argument("--probe-samples", type=int, default=4, help="probes per depth / distance")
    p.add_argument("--passkey-depths", default="0.1,0.5,0.9")
    p.add_argument("--passkey-digits", type=int, default=5)
    p.add_argument("--copy-distances", help="comma list (default: 16, 64, 256, ... that fit)")
    p.add_argument("--copy-span", type=int, default=32, help="tokens per copied span")
    p.add_argument("--tokenizer", default="default", help="default (GPT-2), PATH, or none")
    p.add_argument("--no-recall", action="store_true", help="skip Shared-layer recall")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--chunk", type=int, default=1024, help="rows per output-layer chunk")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check every input, evaluate each source, write and print; 2 for a refused input."""
    try:
        sources, edges, docs, probes = prepare(args)
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from indexcache_train.tools.model_io import init_single_process, write_atomic

    init_single_process(args.seed)
    results = []
    for src in sources:
        start = time.perf_counter()
        results.append(evaluate(args, src, edges, docs, probes))
        print(f"{src.name}: done in {time.perf_counter() - start:.1f} s", flush=True)
    doc = results_document(args, edges, docs, probes, results)
    table = markdown_table(doc)
    out = Path(args.out)
    write_atomic(out / "results.json", (json.dumps(doc, indent=2) + "\n").encode())
    write_atomic(out / "results.md", table.encode())
    print(table, end="")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}")
    return 0


# ---------------------------------------------------------------------- inputs
def _split_named(text: str, flag: str, fix: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise EvalError(f"{flag} {text!r} is not NAME=VALUE. Fix: {fix}")
    return name.strip(), value.strip()


def parse_sources(args: argparse.Namespace) -> list[Source]:
    """``--ckpt`` / ``--model`` / ``--pattern`` -> sources (names unique, patterns attached)."""
    from indexcache_train.model.presets import PRESETS

    sources = []
    for text in args.ckpt:
        name, where = _split_named(text, "--ckpt", "write --ckpt NAME=HF_DIR, e.g. full=ckpts/glm5")
        if not (Path(where) / "config.json").is_file():
            raise EvalError(
                f"--ckpt {name}={where}: no {where}/config.json. Fix: point it at an HF "
                "checkpoint directory (python -m checkpoint_tools export writes one)."
            )
        sources.append(Source(name, "hf", where))
    for text in args.model:
        name, _, preset = text.rpartition("=")
        if preset not in PRESETS:
            raise EvalError(f"--model {text!r}: unknown preset; choose one of {sorted(PRESETS)}")
        sources.append(Source(name or preset, "preset", preset))
    if not sources:
        raise EvalError("nothing to evaluate. Fix: give --ckpt NAME=HF_DIR and/or --model PRESET")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise EvalError(f"checkpoint names {names} repeat. Fix: give each --ckpt/--model a NAME=")
    by_name = {s.name: s for s in sources}
    for text in args.pattern:
        name, pattern = _split_named(text, "--pattern", "write --pattern NAME=FSFS...")
        if name not in by_name:
            raise EvalError(f"--pattern {text!r}: no checkpoint is named {name!r} (have {names})")
        by_name[name].pattern = pattern.upper()
    return sources


def resolve_source(src: Source) -> None:
    """Load the config, build the schedule's ``ModelConfig`` and check the weights it needs."""
    from checkpoint_tools.errors import CheckpointError
    from indexcache_train.model.presets import preset_hf_config
    from indexcache_train.tools.model_io import missing_hf_tensors, trunk_config

    try:
        if src.kind == "hf":
            from checkpoint_tools.hf_io import HFCheckpoint

            src.ckpt = HFCheckpoint(Path(src.where))
            src.hf_config = dict(src.ckpt.config)
        else:
            src.hf_config = preset_hf_config(src.where)
        src.cfg = trunk_config(src.hf_config, src.pattern)
    except (CheckpointError, ValueError) as err:
        raise EvalError(f"{src.name} ({src.where}): {err}") from None
    if src.kind != "hf":
        return
    missing = missing_hf_tensors(src.ckpt.names, src.cfg)
    no_indexer = sorted({int(h.split(".")[2]) for h in missing if ".indexer." in h})
    if no_indexer:
        raise EvalError(
            f"{src.name}: layer(s) {no_indexer} are Full in {src.cfg.schedule.pattern} but "
            f"{src.where} has no indexer weights for them (Shared layers of its schedule). Fix: "
            "use a pattern whose Full layers have indexers, or the all-Full checkpoint."
        )
    if missing:
        raise EvalError(
            f"{src.name}: {src.where} lacks {len(missing)} tensor(s), e.g. {missing[:3]}"
        )


def load_documents(data: str, count: int, min_tokens: int, window: int) -> list[Any]:
    """The first ``count`` documents with >= ``min_tokens`` tokens, each cut to ``window``."""
    import numpy as np
    import torch

    from indexcache_train.data.config import BUNDLED_CORPUS_DIR

    if count == 0:
        return []
    prefix = str(BUNDLED_CORPUS_DIR / "val") if data == "default" else data
    if not (Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()):
        raise EvalError(
            f"--data {data!r}: no {prefix}.bin/.idx. Fix: give an indexed-data prefix "
            "(python -m indexcache_train.data.preprocess) or 'default'."
        )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    lengths = ds.sequence_lengths
    picked = [i for i in range(len(ds)) if int(lengths[i]) >= min_tokens][:count]
    if len(picked) < count:
        longest = int(max(lengths)) if len(ds) else 0
        raise EvalError(
            f"{prefix} has {len(picked)} document(s) with >= {min_tokens} tokens (longest "
            f"{longest}); {count} asked for. Fix: lower --docs, --min-doc-tokens or --seq, or "
            "use data with longer documents."
        )
    return [torch.from_numpy(np.asarray(ds[i][:window], dtype=np.int64)) for i in picked]


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"{flag} {text!r}: expected a comma-separated list of numbers") from None


def build_probes(args: argparse.Namespace, vocab_size: int) -> list[Probe]:
    """The probes of ``--probes`` (the same for every checkpoint), ``--seq + 1`` tokens each."""
    kinds = [k.strip() for k in args.probes.split(",") if k.strip() and k.strip() != "none"]
    if unknown := sorted(set(kinds) - {"passkey", "copy"}):
        raise EvalError(f"--probes: unknown {unknown}; use passkey, copy or none")
    if not kinds:
        return []
    vocab = probe_vocab(args.tokenizer, vocab_size, args.seed)
    length, n = args.seq + 1, args.probe_samples
    probes = []
    try:
        if "passkey" in kinds:
            for j, depth in enumerate(_floats(args.passkey_depths, "--passkey-depths")):
                for s in range(n):
                    seed = args.seed * 1_000_003 + j * 1009 + s
                    probes.append(passkey_probe(length, depth, vocab, seed, args.passkey_digits))
        if "copy" in kinds:
            if args.copy_distances:
                dists = [int(d) for d in _floats(args.copy_distances, "--copy-distances")]
            else:
                dists = default_copy_distances(args.copy_span, length)
            if not dists:
                raise ProbeError(f"no copy distance fits {length} tokens with --copy-span")
            for j, dist in enumerate(dists):
                for s in range(n):
                    seed = args.seed * 1_000_003 + 500_000 + j * 1009 + s
                    probes.append(copy_probe(length, dist, args.copy_span, vocab, seed))
    except ProbeError as err:
        raise EvalError(f"{err}. Fix: a longer --seq, or smaller probe settings") from None
    return probes


def probe_vocab(tokenizer: str, vocab_size: int, seed: int) -> ProbeVocab:
    """Probe ids from ``--tokenizer`` (``default``: the bundled GPT-2 ranks; ``none``: synthetic)."""
    if tokenizer == "none":
        try:
            return ProbeVocab.synthetic(vocab_size, seed)
        except ProbeError as err:
            raise EvalError(str(err)) from None
    from indexcache_train.data.config import BUNDLED_TOKENIZER
    from indexcache_train.data.tokenizer import TokenizerError, load_tokenizer

    try:
        tok = load_tokenizer(BUNDLED_TOKENIZER if tokenizer == "default" else tokenizer)
    except TokenizerError as err:
        raise EvalError(str(err)) from None
    vocab = ProbeVocab.from_tokenizer(tok, vocab_size)
    if vocab.max_id() >= vocab_size:
        raise EvalError(
            f"--tokenizer {tokenizer}: probe token id {vocab.max_id()} >= the models' vocab_size "
            f"{vocab_size}. Fix: pass the models' tokenizer (--tokenizer HF_DIR), or "
            "--tokenizer none (synthetic ids) for toy models."
        )
    return vocab


def prepare(args: argparse.Namespace) -> tuple[list[Source], tuple[int, ...], list, list[Probe]]:
    """Every check that can fail before compute, in order; the inputs of :func:`evaluate`."""
    out = Path(args.out)
    existing = [n for n in _OUTPUTS if (out / n).exists()]
    if existing and not args.overwrite:
        raise EvalError(f"{out} already holds {existing}; pass --overwrite or another --out")
    if args.seq < 2 or args.docs < 0 or args.probe_samples < 1 or args.chunk < 1:
        raise EvalError("--seq must be >= 2, --docs >= 0, --probe-samples and --chunk >= 1")
    try:
        edges = parse_edges(args.buckets)
    except ValueError as err:
        raise EvalError(f"--buckets: {err}") from None
    sources = parse_sources(args)
    for src in sources:
        resolve_source(src)
        if args.seq > src.cfg.max_position_embeddings:
            raise EvalError(
                f"--seq {args.seq} > {src.name}'s max_position_embeddings "
                f"{src.cfg.max_position_embeddings}. Fix: a shorter --seq."
            )
    vocab = min(s.cfg.vocab_size for s in sources)
    min_tokens = args.min_doc_tokens if args.min_doc_tokens is not None else args.seq + 1
    if min_tokens < 2:
        raise EvalError("--min-doc-tokens must be >= 2 (a document needs a target)")
    docs = load_documents(args.data, args.docs, min_tokens, args.seq + 1)
    if docs and (top := max(int(d.max()) for d in docs)) >= vocab:
        raise EvalError(
            f"--data {args.data}: token id {top} >= vocab_size {vocab} (tokenised for another "
            "model). Fix: use data tokenised with the models' tokenizer."
        )
    probes = build_probes(args, vocab)
    if not docs and not probes:
        raise EvalError("nothing to measure: --docs 0 and --probes none")
    return sources, edges, docs, probes


# ---------------------------------------------------------------------- compute
def forward_scores(
    model: Any, cfg: Any, tokens_S: Any, measure_recall: bool, chunk: int
) -> tuple[Any, Any, dict[int, Any]]:
    """``(nll_S, pred_S, recall)`` of one sequence ``tokens_S`` (``S + 1`` ids; row p predicts
    ``tokens_S[p + 1]``), sparse attention with ``cfg``'s schedule.

    The output layer sees only one row during the forward (a pre-hook keeps its input); logits
    are then computed ``chunk`` rows at a time, so no ``[S, V]`` fp32 tensor is built.
    """
    import torch

    from indexcache_train.model.forward_state import DistillSettings, DSAForwardState

    inputs_BS, targets_S = tokens_S[None, :-1], tokens_S[1:]
    S = inputs_BS.shape[1]
    pos = torch.arange(S, device=tokens_S.device)[None]
    seen: dict[str, Any] = {}

    def keep_hidden(_mod: Any, args: tuple, kwargs: dict) -> tuple:
        seen["hidden_SBH"], seen["kwargs"] = args[0], kwargs
        return (args[0][:1], *args[1:]), kwargs

    state = DSAForwardState(
        cfg.schedule,
        pos,
        attention="sparse",
        distill=DistillSettings(mode="none"),
        measure_recall=measure_recall,
    )
    hook = model.output_layer.register_forward_pre_hook(keep_hidden, with_kwargs=True)
    try:
        with torch.no_grad():
            model(inputs_BS, pos, None, dsa_state=state)
    finally:
        hook.remove()
    nll, pred = [], []
    with torch.no_grad():
        for s0 in range(0, S, chunk):
            logits_CBV, _ = model.output_layer(
                seen["hidden_SBH"][s0 : s0 + chunk], **seen["kwargs"]
            )
            n, p = token_scores(logits_CBV[:, 0], targets_S[s0 : s0 + chunk])
            nll.append(n)
            pred.append(p)
    return torch.cat(nll), torch.cat(pred), dict(state.recall)


def evaluate(
    args: argparse.Namespace, src: Source, edges: tuple[int, ...], docs: list, probes: list[Probe]
) -> dict[str, Any]:
    """One source's scores (see :func:`results_document` for the layout)."""
    import torch

    from indexcache_train.tools.model_io import (
        build_loaded,
        random_weights,
        read_hf_weights,
        resolve_device,
    )

    if src.kind == "hf":
        weights = read_hf_weights(src.ckpt, src.cfg)
    else:
        weights = random_weights(src.hf_config, args.seed)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    device = resolve_device(args.device)
    model = build_loaded(src.cfg, weights, dtype).to(device)
    del weights
    sums = torch.zeros(len(edges), dtype=torch.float64)
    counts = torch.zeros(len(edges), dtype=torch.long)
    recall: dict[int, Any] = {}
    for doc in docs:
        nll, _, rec = forward_scores(model, src.cfg, doc.to(device), not args.no_recall, args.chunk)
        context, valid = document_rows([doc.numel()], nll.numel())
        s, c = bucket_sums(nll.cpu(), context, valid, edges)
        sums += s
        counts += c
        for layer, v in rec.items():
            recall[layer] = recall.get(layer, 0) + v.double().cpu()
    probe_scores = []
    for probe in probes:
        tokens = torch.tensor(probe.tokens, device=device)
        nll, pred, _ = forward_scores(model, src.cfg, tokens, False, args.chunk)
        probe_scores.append((probe, score_probe(probe, nll, pred)))
    return source_result(src, edges, sums, counts, recall, probe_scores)


def source_result(src, edges, sums, counts, recall, probe_scores) -> dict[str, Any]:
    """JSON-ready scores of one source."""
    sched = src.cfg.schedule
    labels = bucket_labels(edges)
    buckets = {
        lab: {"loss": float(sums[i] / counts[i]) if counts[i] else None, "tokens": int(counts[i])}
        for i, lab in enumerate(labels)
    }
    total = int(counts.sum())

    def pooled(layers: list[int]) -> float | None:
        have = [recall[i] for i in layers if i in recall]
        rows = sum(float(v[1]) for v in have)
        return sum(float(v[0]) for v in have) / rows if rows else None

    shared = [i for i in range(sched.num_layers) if not sched.is_full(i)]
    full = [i for i in range(sched.num_layers) if sched.is_full(i)]
    return {
        "name": src.name,
        "source": src.where,
        "kind": src.kind,
        "pattern": sched.pattern,
        "num_full": len(full),
        "loss": {"overall": float(sums.sum() / total) if total else None, "tokens": total},
        "buckets": buckets,
        "recall": {
            "shared": pooled(shared),
            "full": pooled(full),
            "per_layer": {str(i): pooled([i]) for i in sorted(recall)},
        },
        "probes": probe_summary(probe_scores),
    }


def probe_summary(probe_scores: list[tuple[Probe, dict[str, float]]]) -> dict[str, Any]:
    """Per kind: mean NLL / accuracy / exact (copy: and ``nll_first``) over all probes and per
    depth or distance."""
    out: dict[str, Any] = {}
    for kind in ("passkey", "copy"):
        mine = [(p, s) for p, s in probe_scores if p.kind == kind]
        if not mine:
            continue
        by: dict[str, list[dict[str, float]]] = {}
        for p, s in mine:
            by.setdefault(f"{p.param:g}", []).append(s)

        def mean(rows: list[dict[str, float]]) -> dict[str, float]:
            return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}

        out[kind] = {
            **mean([s for _, s in mine]),
            "by_param": {k: mean(v) for k, v in by.items()},
            "count": len(mine),
        }
    return out


# ---------------------------------------------------------------------- outputs
def results_document(args, edges, docs, probes, results) -> dict[str, Any]:
    """``results.json``: settings, bucket labels, then one entry per checkpoint."""
    return {
        "settings": {
            "data": args.data,
            "seq": args.seq,
            "docs": len(docs),
            "doc_tokens": [int(d.numel()) for d in docs],
            "bucket_edges": list(edges),
            "probes": len(probes),
            "tokenizer": args.tokenizer,
            "seed": args.seed,
            "dtype": args.dtype,
            "attention": "sparse",
        },
        "buckets": bucket_labels(edges),
        "checkpoints": results,
    }


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(doc: dict[str, Any]) -> str:
    """One row per checkpoint: loss per non-empty bucket, probe accuracies, recall."""
    rows = doc["checkpoints"]
    labels = [b for b in doc["buckets"] if any(r["buckets"][b]["tokens"] for r in rows)]
    kinds = [k for k in ("passkey", "copy") if any(k in r["probes"] for r in rows)]
    header = ["checkpoint", "pattern", "loss", *(f"loss {b}" for b in labels)]
    header += [{"passkey": "passkey exact", "copy": "copy acc"}[k] for k in kinds]
    header += ["shared recall", "full recall"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["name"], f"`{r['pattern']}`", _fmt(r["loss"]["overall"], 4)]
        cells += [_fmt(r["buckets"][b]["loss"], 4) for b in labels]
        for k in kinds:
            p = r["probes"].get(k)
            cells.append("-" if p is None else _fmt(p["exact" if k == "passkey" else "acc"]))
        cells += [_fmt(r["recall"]["shared"]), _fmt(r["recall"]["full"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
