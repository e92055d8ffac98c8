"""In-process analysis steps of the Table-3 protocol (issue #24): export, search, eval, HF check.

The driver (``table3.py``) runs these in its own process, one at a time per worker thread, so
the model-building tools pay their start-up (torch, Megatron) once instead of once per run:

* :func:`export_hf`: a trainer checkpoint -> HF safetensors (``checkpoint_tools export``, bf16);
* :func:`run_tool`: ``python -m indexcache_train.tools VERB ...`` in this process, its output
  to a log file (``search`` for arm (e)'s pattern, ``eval`` for every checkpoint);
* :func:`hf_loss_check`: transformers (``GlmMoeDsaForCausalLM``, the exported ``indexer_types``)
  against our evaluation on the same held-out documents.

The HF check's tolerance is a measured floor, not a constant: ``floor`` is the larger of what
bf16 moves each implementation's held-out loss, |transformers bf16 - transformers fp32| and
|ours bf16 - ours fp32| (our eval verb run again with ``--dtype float32``: bf16 rounding plus
the top-k selections it flips; our path has its own kernels, so transformers' error alone is
not its floor: #24's first run failed on exactly that). Ours (in the eval dtype) passes when it
is within ``max(3 * floor, 1e-4)`` of transformers in fp32, i.e. no further from the fp32
reference than a few times what bf16 alone moves either side. When our fp32 evaluation cannot
run, the floor is transformers' alone and the result says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import table3_base
from table3_runtime import WorkerPool
from table3_runtime import tail as tail_text

log = logging.getLogger("table3")

#: ours-vs-transformers(fp32) must be within this many bf16 floors (see the module doc).
HF_FLOOR_FACTOR = 3.0
#: ... or this absolute NLL difference when the floor is ~0 (fp32 evaluation, CPU smoke).
HF_MIN_TOL = 1e-4


def export_hf(ckpt_dir: Path, out_dir: Path) -> None:
    """Export a trainer checkpoint to an HF directory (bf16 weights, the run's schedule)."""
    from checkpoint_tools.export_megatron import export_checkpoint

    export_checkpoint(ckpt_dir, out_dir, dtype="bfloat16")


def run_tool(argv: list[str], log: Path) -> int:
    """``python -m indexcache_train.tools *argv`` in this process; stdout and stderr to ``log``.

    Returns the verb's exit status (2: refused input, the reason in the log).
    """
    from indexcache_train.tools.__main__ import main

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        f.write(" ".join(["python -m indexcache_train.tools", *argv]) + "\n")
        f.flush()
        try:
            return int(main(argv))
        except SystemExit as exc:  # argparse refusals
            return int(exc.code or 0)
        finally:
            _release_device_memory()


def _release_device_memory() -> None:
    """Give the models' cached blocks back: the training jobs share the device."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def search_argv(hf: Path, target_full: int, train_prefix: str, spec: Any, out: Path) -> list[str]:
    """The ``search`` verb for arm (e): greedy, from the all-Full base, on training data."""
    return [
        "search",
        *("--hf", str(hf), "--target-full", str(target_full), "--data", train_prefix),
        *("--batches", str(spec.search_batches), "--batch-size", "1"),
        *("--seq", str(spec.search_seq), "--dtype", spec.dtype, "--out", str(out)),
    ]


def eval_argv(
    sources: list[tuple[str, Path, str | None]], val_prefix: str, spec: Any, out: Path
) -> list[str]:
    """The ``eval`` verb over ``(name, hf_dir, pattern or None)`` sources, held-out documents."""
    argv = ["eval"]
    for name, hf, pattern in sources:
        argv += ["--ckpt", f"{name}={hf}"]
        if pattern:
            argv += ["--pattern", f"{name}={pattern}"]
    return [
        *argv,
        *("--data", val_prefix, "--seq", str(spec.seq), "--docs", str(spec.docs)),
        *("--buckets", spec.buckets, "--probes", "copy", "--copy-distances", spec.copy_distances),
        *("--copy-span", str(spec.copy_span), "--probe-samples", str(spec.probe_samples)),
        *("--dtype", spec.dtype, "--out", str(out)),
    ]


def hf_check_argv(hf: Path, val_prefix: str, spec: Any, out: Path, dtype: str) -> list[str]:
    """Our side of the HF check: the first ``hf_docs`` evaluation documents, cut shorter."""
    return [
        "eval",
        *("--ckpt", f"ours={hf}", "--data", val_prefix, "--seq", str(spec.hf_seq)),
        *("--docs", str(spec.hf_docs), "--min-doc-tokens", str(spec.seq + 1)),
        *("--probes", "none", "--no-recall", "--dtype", dtype, "--out", str(out)),
    ]


def hf_verdict(
    ours: float, ours_fp32: float | None, theirs_bf16: float, theirs_fp32: float
) -> dict[str, Any]:
    """The HF check's rule (module docstring) on four held-out losses; ``ours_fp32`` None:
    our fp32 evaluation did not run, the floor is transformers' alone."""
    theirs_floor = abs(theirs_bf16 - theirs_fp32)
    ours_floor = None if ours_fp32 is None else abs(ours - ours_fp32)
    floor = max(theirs_floor, ours_floor or 0.0)
    tol = max(HF_FLOOR_FACTOR * floor, HF_MIN_TOL)
    diff = abs(ours - theirs_fp32)
    return {
        "ok": diff <= tol,
        "transformers_bf16_floor": theirs_floor,
        "ours_bf16_floor": ours_floor,
        "bf16_floor": floor,
        "diff_vs_fp32": diff,
        "diff_vs_bf16": abs(ours - theirs_bf16),
        "tolerance": tol,
        "rule": f"|ours - transformers fp32| <= max({HF_FLOOR_FACTOR:g} x floor, {HF_MIN_TOL:g}),"
        " floor = max(|transformers bf16 - fp32|, |ours bf16 - fp32|)",
    }


def _our_loss(hf: Path, val_prefix: str, spec: Any, out: Path, dtype: str, log: Path) -> float:
    """Our eval verb's held-out loss of the HF check's documents in ``dtype``."""
    rc = run_tool(hf_check_argv(hf, val_prefix, spec, out, dtype), log)
    if rc != 0:
        raise RuntimeError(f"our {dtype} evaluation exited {rc} (see {log.name})")
    return json.loads((out / "results.json").read_text())["checkpoints"][0]["loss"]["overall"]


def _transformers_loss(hf: Path, docs: list, dtype: Any, device: Any) -> float:
    """Token-mean NLL of transformers' model over ``docs`` (each: ids, all rows scored)."""
    import torch

    from checkpoint_tools.hf_io import load_config
    from indexcache_train.model.families import get_family
    from indexcache_train.tools.long_eval import token_scores

    cls = get_family(load_config(hf)["model_type"]).hf_model_class()
    model = cls.from_pretrained(str(hf), dtype=dtype, attn_implementation="sdpa").to(device)
    model.eval()
    total, rows = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            ids = doc.to(device)
            logits = model(ids[None, :-1], use_cache=False).logits[0]
            nll, _ = token_scores(logits, ids[1:])
            total += float(nll.double().sum())
            rows += nll.numel()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return total / rows


def hf_loss_check(hf: Path, val_prefix: str, spec: Any, work: Path, log: Path) -> dict[str, Any]:
    """Held-out loss of the exported checkpoint: ours vs transformers (bf16 and fp32).

    Returns a JSON-ready dict with the three losses, the bf16 floor, the tolerance and ``ok``.
    """
    import torch

    from indexcache_train.tools.eval_cli import load_documents
    from indexcache_train.tools.model_io import resolve_device

    t0 = time.perf_counter()
    try:
        ours = _our_loss(hf, val_prefix, spec, work / "ours", spec.dtype, log)
    except RuntimeError as err:
        return {"ok": False, "error": str(err)}
    ours_fp32, fp32_error = ours if spec.dtype == "float32" else None, None
    if ours_fp32 is None:
        try:
            ours_fp32 = _our_loss(hf, val_prefix, spec, work / "ours_fp32", "float32", log)
        except RuntimeError as err:  # the check still runs, on transformers' floor alone
            fp32_error = str(err)
    docs = load_documents(val_prefix, spec.hf_docs, spec.seq + 1, spec.hf_seq + 1)
    device = resolve_device("auto")
    theirs = {
        name: _transformers_loss(hf, docs, dtype, device)
        for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32))
    }
    return {
        **hf_verdict(ours, ours_fp32, theirs["bfloat16"], theirs["float32"]),
        "docs": spec.hf_docs,
        "seq": spec.hf_seq,
        "ours_dtype": spec.dtype,
        "ours": ours,
        "ours_fp32": ours_fp32,
        "ours_fp32_error": fp32_error,
        "transformers_bf16": theirs["bfloat16"],
        "transformers_fp32": theirs["float32"],
        "transformers": __import__("transformers").__version__,
        "wall_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------- the analysis tasks
class Analysis:
    """The protocol's analysis on two worker threads: ``export`` (CPU: checkpoint -> HF) and
    ``eval`` (the device: search, evaluations, HF check), running while the arms train.

    Order on the eval worker: the search first (arm (e) waits for it), then every final
    evaluation and the HF check, then the evaluations after the warm-up (dropped first when
    the deadline comes). Checkpoints are deleted once exported, HF exports once evaluated.
    """

    def __init__(self, ledger: Any, launcher: Any, plan: Any, prefixes: tuple[str, str]) -> None:
        self.ledger, self.launcher, self.plan = ledger, launcher, plan
        self.work: Path = launcher.work
        self.train_prefix, self.val_prefix = prefixes
        self.freq4_pattern = ""
        self.search_state = "pending"  # -> "done" | "failed"
        self.search_pattern: str | None = None
        self.base_hf: Path | None = None
        #: (fingerprint, checkpoint step) of the base: the key of its cached analysis.
        self.base_key: tuple[str, int] = ("", -1)
        self.hf_check_source: str | None = None
        self.pool = WorkerPool(
            ("export", "eval"), lambda label, err: ledger.note(f"{label} failed: {err}")
        )

    def _log(self, name: str) -> Path:
        return self.work / "logs" / f"{name}.log"

    # ------------------------------------------------------------------ the base
    def start_base(self, ckpt: Path, base_name: str, fp: str) -> None:
        """Export the base, then search arm (e)'s pattern, then evaluate the base under its
        own, freq 4's and the searched schedule (zero extra trunk steps). What the work dir's
        cache holds for this fingerprint and checkpoint (``table3_base``) is reused instead."""
        self.base_key = (fp, table3_base.checkpoint_step(ckpt))
        cached = table3_base.load_analysis(self.work, *self.base_key)
        if "search" in cached:
            self._set_search(cached["search"])
        if "reference" in cached:
            self._set_reference(cached["reference"], cached["base_quality"])
        if cached:
            log.info("base analysis reused from the cache: %s", sorted(cached))
        if self.base_done():
            return
        hf = self.work / "hf" / base_name
        # What an earlier call left of an analysis it did not finish: the tools refuse (or
        # resume) an output directory of another run, and this checkpoint may be another one.
        stale = [hf, *([] if "reference" in cached else [self.work / "eval" / base_name])]
        for path in [*stale, *([] if "search" in cached else [self.work / "search"])]:
            shutil.rmtree(path, ignore_errors=True)

        def export() -> None:
            try:
                export_hf(ckpt, hf)
            except Exception:
                self.search_state = "failed"  # (e) must not wait for a search that cannot run
                raise
            self.base_hf = hf
            if self.search_state != "done":
                self.pool.submit("eval", 0, "search", self._search)
            if "reference" not in cached:
                self.pool.submit("eval", 1, "eval base", lambda: self._eval_base(base_name))

        self.pool.submit("export", 0, "export base", export)

    def base_done(self) -> bool:
        """Whether the search and the base's evaluations are known (run or cached)."""
        with self.ledger.lock:
            return self.search_state == "done" and bool(self.ledger.results.get("reference"))

    def _cache(self, **results: Any) -> None:
        table3_base.update_analysis(self.work, *self.base_key, **results)

    def _set_search(self, search: dict[str, Any]) -> None:
        self.search_pattern = search["pattern"]
        with self.ledger.lock:
            self.ledger.results["search"] = search
            self.ledger.results["arms"]["e"]["pattern"] = self.search_pattern
        self.search_state = "done"

    def _set_reference(self, reference: dict[str, Any], quality: dict[str, Any]) -> None:
        with self.ledger.lock:
            self.ledger.results["reference"] = reference
            self.ledger.results["base_quality"] = quality

    def _search(self) -> None:
        out = self.work / "search"
        try:
            argv = search_argv(
                self.base_hf, self.freq4_pattern.count("F"), self.train_prefix, self.plan.eval, out
            )
            rc = run_tool(argv, self._log("search"))
            if rc != 0:
                raise RuntimeError(f"search exited {rc}: {tail_text(self._log('search'))}")
            result = json.loads((out / "result.json").read_text())
        except Exception:
            self.search_state = "failed"
            raise
        search = {k: result[k] for k in ("pattern", "num_full", "baseline_loss", "losses")}
        self._set_search(search)
        self._cache(search=search)
        log.info("search: %s", self.search_pattern)

    def _eval_base(self, base_name: str) -> None:
        import math

        from table3_report import eval_metrics

        sources = [
            (base_name, self.base_hf, None),
            ("base@freq4", self.base_hf, self.freq4_pattern),
        ]
        if self.search_state == "done":
            sources.append(("base@searched", self.base_hf, self.search_pattern))
        doc = self._eval(sources, base_name)
        vocab = json.loads((self.base_hf / "config.json").read_text())["vocab_size"]
        ref = {entry["name"]: eval_metrics(entry) for entry in doc["checkpoints"]}
        with self.ledger.lock:
            base_run = dict(self.ledger.runs[base_name])
        quality = {
            "init_val_loss": (base_run.get("curve", {}).get("lm_loss") or [None])[0],
            "final_val_loss": base_run.get("val_lm_loss"),
            "copy_nll": ref[base_name]["copy_nll"],
            "copy_nll_first": ref[base_name]["copy_nll_first"],
            "ln_vocab": math.log(vocab),
        }
        self._set_reference(ref, quality)
        self._cache(reference=ref, base_quality=quality)
        self.ledger.snapshot()

    def _eval(self, sources: list[tuple[str, Path, str | None]], name: str) -> dict[str, Any]:
        out = self.work / "eval" / name
        rc = run_tool(
            eval_argv(sources, self.val_prefix, self.plan.eval, out), self._log(f"eval_{name}")
        )
        if rc != 0:
            raise RuntimeError(
                f"eval of {name} exited {rc}: {tail_text(self._log(f'eval_{name}'))}"
            )
        return json.loads((out / "results.json").read_text())

    # ------------------------------------------------------------------ the arms
    def run_finished(self, name: str, arm: str, warmup_ckpt: Path | None, final_ckpt: Path) -> None:
        """A finished arm: export its final (and warm-up-end) checkpoint, then evaluate."""
        hf = self.work / "hf" / name

        def export() -> None:
            export_hf(final_ckpt, hf)
            check = arm == "b" and self.hf_check_source is None
            if check:
                self.hf_check_source = name
            self.pool.submit(
                "eval", 1, f"eval {name}", lambda: self._eval_run(name, hf, "final", not check)
            )
            if check:
                self.pool.submit("eval", 2, f"hf check {name}", lambda: self._hf_check(name, hf))
            if warmup_ckpt is not None:
                hf_warm = self.work / "hf" / f"{name}@warmup"
                export_hf(warmup_ckpt, hf_warm)
                self.pool.submit(
                    "eval",
                    3,
                    f"eval {name}@warmup",
                    lambda: self._eval_run(name, hf_warm, "warmup_end", True),
                )
            shutil.rmtree(final_ckpt.parent, ignore_errors=True)  # the exports hold it all

        self.pool.submit("export", 1, f"export {name}", export)

    def _eval_run(self, name: str, hf: Path, key: str, delete: bool) -> None:
        from table3_report import eval_metrics

        label = name if key == "final" else f"{name}@warmup"
        metrics = eval_metrics(self._eval([(label, hf, None)], label)["checkpoints"][0])
        run = self.ledger.runs[name]
        if key == "final":  # the trainer's own last held-out evaluation (L_multi)
            metrics.update({k: run.get(k) for k in ("l_multi", "val_lm_loss", "shared_kl")})
        self.ledger.update_run(name, **{key: metrics})
        if delete:
            shutil.rmtree(hf, ignore_errors=True)
        self.ledger.snapshot()

    def _hf_check(self, name: str, hf: Path) -> None:
        result = hf_loss_check(
            hf, self.val_prefix, self.plan.eval, self.work / "hfcheck", self._log("hf_check")
        )
        self.ledger.set("hf_check", {"source": name, **result})
        shutil.rmtree(hf, ignore_errors=True)
        log.info(
            "hf check: ok %s, ours %s, transformers fp32 %s",
            result.get("ok"),
            result.get("ours"),
            result.get("transformers_fp32"),
        )
