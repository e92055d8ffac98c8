"""Results of the Table-3 protocol (scripts/experiments/table3_report.py) on synthetic runs."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts/experiments"))

from table3_report import (
    by_arm,
    eval_metrics,
    render_markdown,
    summarize,
    trainer_metrics,
    write_plots,
)

#: arm -> per-seed held-out loss (a ~ b < c < d, as in the paper) and copy NLL.
LOSS = {
    "a": (5.000, 5.010, 4.990),
    "b": (5.010, 5.015, 5.005),
    "c": (5.100, 5.120, 5.080),
    "d": (5.300, 5.350, 5.250),
}
COPY = {"a": (3.0, 3.1, 2.9), "b": (3.0, 3.1, 3.0), "c": (3.2, 3.35, 3.05), "d": (4.0, 4.2, 3.8)}


def _entry(loss: float, copy: float, pattern: str) -> dict:
    """One checkpoint of the eval verb's results.json."""
    return {
        "name": "x",
        "pattern": pattern,
        "loss": {"overall": loss, "tokens": 100},
        "buckets": {
            "0-512": {"loss": loss - 0.5, "tokens": 50},
            "512+": {"loss": loss + 0.5, "tokens": 50},
            "4K+": {"loss": None, "tokens": 0},
        },
        "recall": {"shared": 0.5, "full": 0.8, "per_layer": {}},
        "probes": {
            "copy": {
                "nll": copy,
                "acc": 0.4,
                "exact": 0.0,
                "nll_first": copy + 5,
                "count": 4,
                "by_param": {"64": {"nll": copy - 1, "acc": 0.5, "exact": 0.0, "nll_first": 8.0},
                             "1024": {"nll": copy + 1, "acc": 0.3, "exact": 0.0, "nll_first": 8.0}},
            }
        },
    }  # fmt: skip


def _runs() -> dict:
    runs = {}
    for arm, losses in LOSS.items():
        for seed, (loss, copy) in enumerate(zip(losses, COPY[arm]), start=1):
            final = eval_metrics(_entry(loss, copy, "FSSSFSSS"))
            final.update(l_multi=0.1 * seed, val_lm_loss=loss + 0.1)
            runs[f"{arm}_s{seed}"] = {"arm": arm, "seed": seed, "status": "done", "final": final}
    runs["e_s1"] = {"arm": "e", "seed": 1, "status": "partial", "final": None}
    runs["base"] = {"arm": "base", "seed": None, "status": "done"}
    return runs


def test_eval_and_trainer_metrics_parse_the_tools_outputs() -> None:
    m = eval_metrics(_entry(5.0, 3.0, "FSSS"))
    assert m["loss"] == 5.0 and m["buckets"] == {"0-512": 4.5, "512+": 5.5}  # empty dropped
    assert m["copy_nll"] == 3.0 and m["copy_nll_first"] == 8.0
    assert m["copy_nll_by_distance"] == {"64": 2.0, "1024": 4.0}
    assert m["shared_recall"] == 0.5
    rows = [
        {"step": 0, "stage": "warmup", "eval/lm_loss": 6.0, "eval/l_multi": 2.0},
        {"step": 4, "stage": "sparse", "eval/lm_loss": 5.5, "eval/l_multi": 1.5, "eval/shared_kl": 0.3},
    ]  # fmt: skip
    t = trainer_metrics(rows)
    assert (t["val_lm_loss"], t["l_multi"], t["shared_kl"]) == (5.5, 1.5, 0.3)
    assert t["curve"]["step"] == [0, 4] and t["curve"]["stage"] == ["warmup", "sparse"]
    assert trainer_metrics([]) == {}


def test_summary_means_gaps_and_orderings() -> None:
    s = summarize(_runs())
    assert set(s["arms"]) == {"a", "b", "c", "d"}  # (e) is partial: not in the statistics
    for arm, losses in LOSS.items():
        got = s["arms"][arm]["loss"]
        assert got["mean"] == pytest.approx(statistics.fmean(losses))
        assert got["std"] == pytest.approx(statistics.stdev(losses)) and got["n"] == 3
    gap_c = 100 * (statistics.fmean(LOSS["c"]) / statistics.fmean(LOSS["a"]) - 1)
    assert s["gaps_pct"]["c"]["loss"] == pytest.approx(gap_c)
    assert s["gaps_pct"]["a"]["loss"] == 0.0
    assert "loss 0-512" in s["arms"]["b"] and "copy_nll @1024" in s["arms"]["b"]
    order = {(o["metric"], o["lower"], o["higher"]): o for o in s["orderings"]}
    bc = order[("loss", "b", "c")]
    pooled = ((statistics.stdev(LOSS["b"]) ** 2 + statistics.stdev(LOSS["c"]) ** 2) / 2) ** 0.5
    diff = statistics.fmean(LOSS["c"]) - statistics.fmean(LOSS["b"])
    assert bc["in_std"] == pytest.approx(diff / pooled) and bc["paired_n"] == 3
    assert ("loss", "b", "e") not in order  # nothing to compare (e) with


def test_claims_follow_the_paper_ordering() -> None:
    claims = {c["claim"]: c["holds"] for c in summarize(_runs())["claims"]}
    assert claims["loss: (b) within 0.5% of (a)"] is True
    assert claims["loss: (c) worse than (b) by > 2 seed std"] is True
    assert claims["loss: (d) worse than (b) by > 2 seed std"] is True
    assert claims["loss: paper ordering (a) ≈ (b) < (c) < (d)"] is True
    # copy NLL: (c) - (b) = 0.167, seed std 0.15 and 0.058 (pooled 0.114): 1.5 std, not > 2.
    assert claims["copy_nll: (c) worse than (b) by > 2 seed std"] is False
    # Swap (b) and (d): (b) is no longer near (a) and the ordering fails.
    runs = _runs()
    for seed in (1, 2, 3):
        runs[f"b_s{seed}"]["arm"], runs[f"d_s{seed}"]["arm"] = "d", "b"
    claims = {c["claim"]: c["holds"] for c in summarize(runs)["claims"]}
    assert claims["loss: (b) within 0.5% of (a)"] is False
    assert claims["loss: paper ordering (a) ≈ (b) < (c) < (d)"] is False
    assert claims["loss: (c) worse than (b) by > 2 seed std"] is False


def test_only_finished_runs_count() -> None:
    runs = _runs()
    runs["a_s3"]["status"] = "partial"
    runs["b_s2"]["final"] = None  # done but its evaluation did not finish
    table = by_arm(runs)
    assert set(table["a"]["loss"]) == {1, 2} and set(table["b"]["loss"]) == {1, 3}
    assert "e" not in table


def test_markdown_lists_every_arm_and_why_one_is_missing() -> None:
    runs = _runs()
    runs["e_s1"].update(status="same_as_d", reason="the searched pattern is freq 4's")
    results = {
        "mode": "gpu",
        "status": "partial",
        "arms": {k: {"label": f"arm {k}", "pattern": "FSSSFSSS"} for k in "abcde"},
        "runs": runs,
        "summary": summarize(runs),
        "sizing": {"warmup": 12, "sparse": 12},
        "hf_check": {
            "ok": True, "docs": 4, "seq": 4096, "transformers": "5.17.0", "ours_dtype": "bfloat16",
            "ours": 5.0, "transformers_bf16": 5.001, "transformers_fp32": 5.0005,
            "bf16_floor": 5e-4, "diff_vs_fp32": 5e-4, "tolerance": 1.5e-3, "rule": "r",
        },
    }  # fmt: skip
    md = render_markdown(results)
    rows = [ln for ln in md.splitlines() if ln.startswith("| (")]
    assert [r.split(" | ")[0] for r in rows[:5]] == [f"| ({k}) arm {k}" for k in "abcde"]
    assert "same_as_d (the searched pattern is freq 4's)" in rows[4]
    a_mean = statistics.fmean(LOSS["a"])
    assert f"{a_mean:.4f} ± {statistics.stdev(LOSS['a']):.4f}" in rows[0]
    assert "+0.00%" in rows[0] and "**PASS**" in md
    assert "| loss | (b) < (c) |" in md
    assert all(len(r.split("|")) == len(rows[0].split("|")) for r in rows[:5])


def test_plots_need_matplotlib_or_say_how_to_get_it(tmp_path: Path) -> None:
    """With matplotlib: both PNGs are written; without: a RuntimeError naming the fix."""
    runs = _runs()
    for run in runs.values():
        if run.get("final"):
            run["curve"] = {"step": [0, 2, 4], "stage": ["warmup", "sparse", "sparse"],
                            "lm_loss": [6.0, 5.5, 5.4], "l_multi": [2.0, 1.0, 1.1]}  # fmt: skip
    results = {
        "arms": {k: {"label": k, "warmup": k in "abc"} for k in "abcde"},
        "sizing": {"warmup": 2},
        "reference": {"base": eval_metrics(_entry(5.0, 3.0, "FFFFFFFF"))},
    }
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install matplotlib"):
            write_plots(results, runs, tmp_path)
        return
    files = write_plots(results, runs, tmp_path)
    assert [f.name for f in files] == ["loss_vs_steps.png", "copy_vs_distance.png"]
    assert all(
        f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 10_000 for f in files
    )


def test_hf_rule_uses_the_larger_floor_and_can_fail() -> None:
    """#24's first run: ours 5.89338, transformers bf16 5.89349, fp32 5.89352 failed on
    transformers' floor alone (3.2e-5). Our own bf16-vs-fp32 difference is a floor too."""
    from table3_analysis import hf_verdict

    ours, bf16, fp32 = 5.89338, 5.89349, 5.89352
    alone = hf_verdict(ours, None, bf16, fp32)
    assert not alone["ok"] and alone["ours_bf16_floor"] is None
    ok = hf_verdict(ours, 5.89350, bf16, fp32)  # our bf16 moves our loss by 1.2e-4
    assert ok["ok"] and ok["bf16_floor"] == pytest.approx(1.2e-4)
    assert ok["tolerance"] == pytest.approx(3.6e-4)
    # An export bug moves our loss in both dtypes: beyond the floor, the check fails.
    planted = hf_verdict(ours + 1e-3, 5.89350 + 1e-3, bf16, fp32)
    assert not planted["ok"] and planted["diff_vs_fp32"] > planted["tolerance"]
    exact = hf_verdict(5.0, 5.0, 5.0, 5.0)  # fp32 everywhere: the absolute minimum applies
    assert exact["ok"] and exact["tolerance"] == pytest.approx(1e-4)
