"""Greedy pattern search: commits are the per-step argmin, targets are met, resume is exact."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from indexcache_train.tools.pattern_search import (
    SearchError,
    SearchLogError,
    block_bounds,
    block_quotas,
    flip,
    greedy_search,
)
from tests.helpers.images import read_png

pytestmark = pytest.mark.unit


def synthetic_loss(pattern: str) -> float:
    """Deterministic, non-additive: per-layer costs grow with the distance to the source layer,
    plus a pattern-hash term so flips interact and greedy choices differ step to step."""
    loss, source = 1.0, 0
    for i, c in enumerate(pattern):
        if c == "F":
            source = i
        else:
            loss += (0.05 + 0.01 * ((i * 7) % 5)) * (1 + 0.3 * (i - source))
    noise = int(hashlib.sha256(pattern.encode()).hexdigest()[:8], 16) / 16**8
    return loss + 0.02 * noise


class Recorder:
    """``evaluate`` that records calls and can fail after ``fail_after`` calls (an interruption)."""

    def __init__(self, fn=synthetic_loss, fail_after: int | None = None) -> None:
        self.fn, self.fail_after, self.calls = fn, fail_after, []

    def __call__(self, pattern: str) -> float:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls.append(pattern)
        return self.fn(pattern)


def _records(path: Path, kind: str) -> list[dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in lines if r["kind"] == kind]


# ---------------------------------------------------------------------- Algorithm 1
@pytest.mark.parametrize("n,k", [(8, 2), (8, 1), (12, 3), (5, 5), (6, 5)])
def test_each_commit_is_the_min_over_its_candidates_recomputed_independently(
    tmp_path: Path, n: int, k: int
) -> None:
    log = tmp_path / "log.jsonl"
    result = greedy_search(n, k, synthetic_loss, log_path=log)
    assert result.pattern.count("F") == k and result.pattern[0] == "F"
    assert len(result.commits) == n - k
    commits = _records(log, "commit")
    assert [c["pattern"] for c in commits] == [c.pattern for c in result.commits]
    before = "F" * n
    for c in commits:
        # Independent recomputation from the pre-step pattern (not from the log's numbers).
        cands = {j: synthetic_loss(flip(before, j)) for j in range(1, n) if before[j] == "F"}
        best = min(cands, key=lambda j: (cands[j], j))
        assert [f["layer"] for f in c["flips"]] == [best]
        assert c["loss"] == cands[best] == min(cands.values())
        assert {int(j): v for j, v in c["candidates"]} == cands
        assert c["pattern"] == flip(before, best)
        before = c["pattern"]
    assert result.losses == [synthetic_loss("F" * n)] + [c["loss"] for c in commits]


def test_ties_go_to_the_lowest_layer_and_layer_0_is_never_flipped() -> None:
    result = greedy_search(6, 2, lambda p: 1.0)
    assert [c.flips[0].layer for c in result.commits] == [1, 2, 3, 4]
    assert result.pattern == "FSSSSF"
    # Even when flipping layer 0 would be "best", it is never a candidate.
    result = greedy_search(4, 1, lambda p: 0.0 if p[0] == "S" else float(p.count("F")))
    assert result.pattern == "FSSS"
    assert all(0 not in c.candidates for c in result.commits)


def test_non_finite_losses_never_win() -> None:
    result = greedy_search(4, 3, lambda p: float("nan") if p[1] == "S" else 2.0)
    assert result.pattern == "FFSF"


@pytest.mark.parametrize(
    "n,k,blocks,match",
    [(4, 0, 1, "outside"), (4, 5, 1, "outside"), (6, 2, 3, "--blocks 3 > --target-full 2")],
)
def test_impossible_requests_are_refused(n: int, k: int, blocks: int, match: str) -> None:
    with pytest.raises(SearchError, match=match):
        greedy_search(n, k, synthetic_loss, blocks)


# ---------------------------------------------------------------------- pipeline blocks
def test_block_split_and_quotas() -> None:
    assert block_bounds(10, 3) == [range(0, 4), range(4, 7), range(7, 10)]
    assert block_quotas(block_bounds(10, 3), 5) == [2, 2, 1]
    assert block_quotas(block_bounds(78, 8), 20) == [3, 3, 3, 3, 2, 2, 2, 2]
    for n, p, k in [(7, 2, 2), (9, 4, 4), (78, 8, 78), (16, 4, 9)]:
        q = block_quotas(block_bounds(n, p), k)
        assert sum(q) == k and all(1 <= x <= len(r) for x, r in zip(q, block_bounds(n, p)))


def test_blocked_commits_one_best_flip_per_block_per_step(tmp_path: Path) -> None:
    n, k, p = 10, 5, 3
    log = tmp_path / "log.jsonl"
    result = greedy_search(n, k, synthetic_loss, p, log)
    bounds = block_bounds(n, p)
    assert result.pattern.count("F") == k
    assert all(result.pattern[r.start] == "F" for r in bounds)
    for r, q in zip(bounds, block_quotas(bounds, k)):
        assert result.pattern[r.start : r.stop].count("F") == q
    before = "F" * n
    commits = _records(log, "commit")
    assert len(commits) == 2  # blocks of 4/3/3 layers keep 2/2/1: at most 2 flips per block
    for c in commits:
        after = before
        for f in c["flips"]:
            r = bounds[f["block"]]
            cands = {j: synthetic_loss(flip(before, j)) for j in r[1:] if before[j] == "F"}
            best = min(cands, key=lambda j: (cands[j], j))
            assert f["layer"] == best and f["loss"] == cands[best]
            after = flip(after, best)
        blocks_flipped = [f["block"] for f in c["flips"]]
        assert blocks_flipped == sorted(set(blocks_flipped))  # at most one per block
        assert c["pattern"] == after and c["loss"] == synthetic_loss(after)
        before = after
    assert [len(c["flips"]) for c in commits] == [3, 2]


# ---------------------------------------------------------------------- resume
@pytest.mark.parametrize("blocks,fail_after", [(1, 12), (1, 1), (2, 9), (2, 17)])
def test_interrupted_search_resumes_to_the_same_pattern(
    tmp_path: Path, blocks: int, fail_after: int
) -> None:
    n, k = 9, 3
    reference = greedy_search(n, k, synthetic_loss, blocks)
    log = tmp_path / "log.jsonl"
    first = Recorder(fail_after=fail_after)
    with pytest.raises(KeyboardInterrupt):
        greedy_search(n, k, first, blocks, log)
    committed = len(_records(log, "commit"))
    second = Recorder()
    result = greedy_search(n, k, second, blocks, log)
    assert result.pattern == reference.pattern
    assert result.losses == reference.losses
    assert result.resumed_commits == committed
    # Nothing the first run evaluated (committed steps included) is evaluated again.
    assert not set(first.calls) & set(second.calls)
    assert len(first.calls) + len(second.calls) == len(set(first.calls) | set(second.calls))
    # A finished search replays entirely from its log.
    third = Recorder()
    assert greedy_search(n, k, third, blocks, log).pattern == reference.pattern
    assert third.calls == []


def test_torn_last_line_is_dropped_and_the_log_stays_appendable(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    with pytest.raises(KeyboardInterrupt):
        greedy_search(8, 2, Recorder(fail_after=10), log_path=log)
    with open(log, "ab") as f:
        f.write(b'{"kind": "eval", "step": 3, "pattern": "FFS')  # crash mid-write
    result = greedy_search(8, 2, Recorder(), log_path=log)
    assert result.pattern == greedy_search(8, 2, synthetic_loss).pattern
    for line in log.read_text().splitlines():
        json.loads(line)  # every line parses again


def test_corrupt_line_inside_the_log_is_refused(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    greedy_search(6, 3, synthetic_loss, log_path=log)
    lines = log.read_text().splitlines()
    lines[2] = lines[2][:10]
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(SearchLogError, match="line 3 is not JSON"):
        greedy_search(6, 3, synthetic_loss, log_path=log)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"target_full": 2}, "target_full: log 3 vs now 2"),
        ({"num_layers": 7}, "num_layers"),
        ({"blocks": 2}, "blocks"),
        ({"meta": {"model": "other"}}, "meta"),
    ],
)
def test_log_of_another_search_is_refused(tmp_path: Path, kwargs: dict, match: str) -> None:
    log = tmp_path / "log.jsonl"
    greedy_search(6, 3, synthetic_loss, log_path=log, meta={"model": "toy"})
    args = {"num_layers": 6, "target_full": 3, "blocks": 1, "meta": {"model": "toy"}, **kwargs}
    with pytest.raises(SearchLogError, match=match):
        greedy_search(
            args["num_layers"],
            args["target_full"],
            synthetic_loss,
            args["blocks"],
            log,
            meta=args["meta"],
        )


def test_replay_that_disagrees_with_a_logged_commit_is_refused(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    greedy_search(6, 3, synthetic_loss, log_path=log)
    lines = log.read_text().splitlines()
    k = next(i for i, x in enumerate(lines) if '"kind": "commit"' in x)
    first = json.loads(lines[k])["pattern"]
    forged = first[0] + first[1:][::-1]
    assert forged != first
    lines[k] = lines[k].replace(f'"pattern": "{first}"', f'"pattern": "{forged}"')
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(SearchLogError, match="step 1 was logged as"):
        greedy_search(6, 3, synthetic_loss, log_path=log)


# ---------------------------------------------------------------------- the CLI on a toy
def test_cli_search_on_a_toy_writes_log_result_and_png(tmp_path: Path, capsys) -> None:
    from indexcache_train.tools.__main__ import main

    argv = ["search", "--model", "glm5_toy", "--seed", "0", "--target-full", "2"]
    argv += ["--data", "default", "--batches", "2", "--seq", "32", "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    pattern = result["pattern"]
    assert len(pattern) == 4 and pattern.count("F") == 2 and pattern[0] == "F"
    assert result["indexer_types"] == ["full" if c == "F" else "shared" for c in pattern]
    assert result["config_keys"]["indexer_types"] == result["indexer_types"]
    commits = _records(tmp_path / "search_log.jsonl", "commit")
    assert len(commits) == 2 and commits[-1]["pattern"] == pattern
    assert result["losses"][1:] == [c["loss"] for c in commits]
    for c in commits:  # the model-side losses obey the same argmin contract
        assert c["loss"] == min(v for _, v in c["candidates"])
    pixels = read_png(tmp_path / "loss.png")
    assert pixels.shape[:2] == (400, 640) and pixels.std() > 0  # drawn, not blank
    out = capsys.readouterr().out
    assert "step 2:" in out
    # Rerunning the same command resumes: nothing is evaluated again.
    assert main(argv) == 0
    assert "0 evaluation(s) this run, 2 commit(s) resumed" in capsys.readouterr().out


def test_cli_search_runs_in_the_dtype_asked_and_logs_it(tmp_path: Path, capsys) -> None:
    """``--dtype bfloat16`` (the GPU kernels' precision) changes the losses, and a log written in
    one precision is not resumed in the other (its cached losses would be the wrong ones)."""
    from indexcache_train.tools.__main__ import main

    argv = ["search", "--model", "glm5_toy", "--seed", "0", "--target-full", "3"]
    argv += ["--data", "default", "--batches", "1", "--seq", "32"]
    runs = {}
    for dtype in ("float32", "bfloat16"):
        assert main([*argv, "--dtype", dtype, "--out", str(tmp_path / dtype)]) == 0
        runs[dtype] = json.loads((tmp_path / dtype / "result.json").read_text())
        header = json.loads((tmp_path / dtype / "search_log.jsonl").read_text().splitlines()[0])
        assert header["meta"]["dtype"] == dtype
    fp32, bf16 = (runs[d]["baseline_loss"] for d in ("float32", "bfloat16"))
    assert fp32 != bf16 and bf16 == pytest.approx(fp32, rel=2e-2)
    capsys.readouterr()
    assert main([*argv, "--dtype", "bfloat16", "--out", str(tmp_path / "float32")]) == 2
    assert "another search" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--target-full", "0"], "outside \\[1, 4\\]"),
        (["--target-full", "5"], "outside \\[1, 4\\]"),
        (["--target-full", "2", "--blocks", "3"], "--blocks <= 2"),
    ],
)
def test_cli_refuses_impossible_targets(tmp_path: Path, capsys, extra: list, match: str) -> None:
    from indexcache_train.tools.__main__ import main

    assert main(["search", "--model", "glm5_toy", "--out", str(tmp_path), *extra]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_cli_refuses_a_checkpoint_that_is_not_all_full(tmp_path: Path, capsys) -> None:
    from indexcache_train.model.toy_configs import glm5_toy_hf_config
    from indexcache_train.tools.__main__ import main

    hf = glm5_toy_hf_config(num_mtp_layers=0, indexer_types=["full", "shared", "full", "shared"])
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(hf))
    argv = ["search", "--hf", str(tmp_path / "ckpt"), "--target-full", "2", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Shared" in err and "all-Full" in err and "Fix:" in err
    assert not (tmp_path / "search_log.jsonl").exists()


def test_cli_refuses_shared_layers_without_indexer_tensors(tmp_path: Path, capsys) -> None:
    """Config claims all-Full, but the tensors of layers 1 and 3 have no indexer."""
    from indexcache_train.tools.__main__ import main
    from tests.helpers.hf_toys import make_glm5_toy_config, save_toy_checkpoint

    cfg = make_glm5_toy_config(vocab_size=50304, indexer_types=["full", "shared", "full", "shared"])
    ckpt = save_toy_checkpoint(cfg, tmp_path / "ckpt", with_mtp=False)
    config = json.loads((ckpt / "config.json").read_text())
    config["indexer_types"] = ["full"] * 4
    (ckpt / "config.json").write_text(json.dumps(config))
    argv = ["search", "--hf", str(ckpt), "--target-full", "2", "--batches", "1", "--seq", "16"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "layer(s) [1, 3] have no indexer tensors" in err


def test_cli_search_from_an_hf_checkpoint_scores_what_transformers_scores(
    tmp_path: Path, capsys
) -> None:
    """The all-Full loss the search starts from is transformers' own loss on the same tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from indexcache_train.tools.__main__ import main
    from indexcache_train.tools.search_cli import load_calibration_batches
    from tests.helpers.hf_toys import make_glm5_toy_config, save_toy_checkpoint

    ckpt = save_toy_checkpoint(
        make_glm5_toy_config(vocab_size=50304), tmp_path / "ckpt", with_mtp=True
    )
    argv = ["search", "--hf", str(ckpt), "--target-full", "2", "--blocks", "2"]
    argv += ["--batches", "1", "--seq", "24", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["pattern"][0] == "F" and result["pattern"][2] == "F"  # block firsts
    assert result["pattern"].count("F") == 2
    assert "convert-schedule" in result["apply"]
    (batch,) = load_calibration_batches("default", 1, 1, 24)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        # HF shifts labels itself: positions 0..S-1 predict tokens 1..S, as in the search (the
        # extra last input token changes no earlier logit or top-k: both are causal).
        ref = hf(batch, labels=batch).loss.item()
    assert abs(result["baseline_loss"] - ref) < 1e-4, (result["baseline_loss"], ref)
