"""The Table-3 protocol's plan (scripts/experiments/table3_plan.py): jobs, overrides, sizing.

The overrides are also composed and validated by the trainer's own config code here, so a
renamed config key or group breaks this test, not the one GPU call."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts/experiments"))

from table3_plan import (  # noqa: E402
    WARMUP_OVER_DENSE,
    Job,
    Speeds,
    arm_jobs,
    eval_interval,
    gpu_plan,
    job_gpu_seconds,
    job_overrides,
    predicted_wall_s,
    size_arms,
    smoke_plan,
    stage_override,
    with_overrides,
)

SPARSE = {"name": "sparse", "steps": 12, "lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 2,
          "attention": "sparse", "trainable": "all", "indexer_lr": None}  # fmt: skip


def test_jobs_cover_every_arm_and_seed_with_e_after_the_first_round() -> None:
    plan = gpu_plan()
    names = [j.name for j in arm_jobs(plan)]
    assert names[:5] == ["a_s1", "b_s1", "c_s1", "d_s1", "e_s1"]
    assert sorted(names) == sorted([f"{a}_s{s}" for a in "abcd" for s in (1, 2, 3)] + ["e_s1"])
    three_e = arm_jobs(with_overrides(plan, e_seeds=3))
    assert [j.name for j in three_e][-2:] == ["e_s2", "e_s3"]


def test_overrides_per_arm() -> None:
    ov = {a: job_overrides(Job(f"{a}_s2", a, 2), 6, 8, 4, SPARSE, "FSSFSSSS") for a in "abcde"}
    for a in "abc":  # warm-up arms keep the YAML's two stages, steps replaced
        assert "recipe.stages.0.steps=6" in ov[a] and "recipe.stages.1.steps=8" in ov[a]
    for a in "de":  # no warm-up (distill=none has no indexer loss): the sparse stage alone
        stage = [o for o in ov[a] if o.startswith("recipe.stages=")]
        assert stage == [stage_override({**SPARSE, "steps": 8})]
        assert "steps: 8" in stage[0] and "name: warmup" not in stage[0]
        assert "indexer_lr" not in stage[0]  # None fields are left out
    assert "indexcache=off" in ov["a"] and "distill=own_layer" in ov["a"]
    assert "distill=multi" in ov["b"] and "distill=own_layer" in ov["c"]
    assert "distill=none" in ov["d"] and "indexcache=freq4" in ov["d"]
    assert "indexcache.index_topk_pattern=FSSFSSSS" in ov["e"]
    assert all("run.seed=2" in o and "logging.eval_interval=4" in o for o in ov.values())
    with pytest.raises(ValueError, match="searched pattern"):
        job_overrides(Job("e_s1", "e", 1), 6, 8, 4, SPARSE, None)


def test_overrides_compose_and_validate(monkeypatch) -> None:
    """Every arm's overrides, on the smoke model, pass the trainer's own composition and
    validation; the schedules and recipes are the ones the arms are meant to run."""
    from indexcache_train.config.compose import compose
    from indexcache_train.config.validate import validate

    plan = smoke_plan()
    got = {}
    for a in "abcde":
        ov = job_overrides(Job(f"{a}_s1", a, 1), 3, 4, 2, SPARSE, "FSSFSSSS")
        cfg = compose(["+experiment=table3_arm", *plan.common, *ov])
        got[a] = (validate(cfg, 1).model.schedule.pattern, cfg.distill.mode, cfg.recipe.stages)
    assert got["a"][0] == "FFFFFFFF" and got["b"][0] == got["c"][0] == got["d"][0] == "FSSSFSSS"
    assert got["e"][0] == "FSSFSSSS"
    assert [s.steps for s in got["b"][2]] == [3, 4] and got["b"][2][0].trainable == "indexers"
    assert [s.steps for s in got["d"][2]] == [4] and got["d"][2][0].attention == "sparse"
    assert got["d"][2][0].lr == SPARSE["lr"] and got["d"][2][0].warmup_steps == 2


def test_base_and_arms_train_on_repeated_spans() -> None:
    """The base must learn copying for the copy probe to rank the arms: table3_base repeats
    spans in half the training samples and the arms inherit it; the smoke's 129-token samples
    take spans of 8."""
    from indexcache_train.config.compose import compose
    from indexcache_train.config.validate import validate

    for experiment in ("table3_base", "table3_arm"):
        data = compose([f"+experiment={experiment}"]).data
        assert (data.repeat_fraction, data.repeat_span, data.repeat_count) == (0.5, 64, 16)
        cfg = compose([f"+experiment={experiment}", *smoke_plan().common])
        assert (cfg.data.repeat_fraction, cfg.data.repeat_span) == (0.5, 8)
        validate(cfg, 1)


def test_eval_interval_hits_the_warmup_end_and_the_sparse_stage() -> None:
    assert eval_interval(12, 12, 2) == 6  # evals at 6, 12 (warm-up end), 18, 24
    assert eval_interval(0, 12, 2) == 6
    assert eval_interval(2, 2, 2) == 1
    assert eval_interval(10, 12, 2) == 2  # gcd(10, 6)
    for w, s in ((12, 12), (10, 12), (7, 16)):
        i = eval_interval(w, s, 2)
        assert w % i == 0 and (s // 2) % i == 0


def test_sizing_picks_the_largest_even_s_that_fits() -> None:
    plan = gpu_plan()
    jobs = arm_jobs(plan)
    speeds = Speeds(dense_step_s=0.7, sparse_step_s=0.9, overhead_s=25.0)
    sizing = size_arms(plan, speeds, 275.0, jobs)
    assert sizing.fits and not sizing.fixed and sizing.sparse % 2 == 0
    assert sizing.warmup == sizing.sparse  # warmup_ratio 1
    assert sizing.predicted_s <= 275.0
    assert predicted_wall_s(plan, speeds, jobs, sizing.sparse + 2, sizing.sparse + 2) > 275.0
    # The prediction, by hand: 9 warm-up jobs, 4 without; pack factor; one overhead.
    w = s = sizing.sparse
    hand = plan.pack_factor * (9 * (w * WARMUP_OVER_DENSE * 0.7 + s * 0.9) + 4 * s * 0.9) + 25.0
    assert sizing.predicted_s == pytest.approx(hand)
    assert job_gpu_seconds(plan, speeds, "d", w, s) == pytest.approx(plan.pack_factor * s * 0.9)


def test_sizing_bounds_fixed_steps_and_missing_inputs() -> None:
    plan = gpu_plan()
    jobs = arm_jobs(plan)
    slow = Speeds(dense_step_s=50.0, sparse_step_s=50.0, overhead_s=25.0)
    tight = size_arms(plan, slow, 100.0, jobs)
    assert not tight.fits and tight.sparse == plan.sparse_bounds[0]
    fast = size_arms(plan, Speeds(0.01, 0.01, 1.0), 1e6, jobs)
    assert fast.fits and fast.sparse == plan.sparse_bounds[1]
    fixed = size_arms(with_overrides(plan, arm_steps=(5, 8)), None, None, jobs)
    assert (fixed.warmup, fixed.sparse, fixed.fixed, fixed.predicted_s) == (5, 8, True, None)
    with pytest.raises(ValueError, match="measured speeds"):
        size_arms(plan, None, None, jobs)


def test_budgets_leave_room_for_the_arms() -> None:
    for plan in (gpu_plan(), smoke_plan()):
        assert (
            0
            < plan.base_deadline_s
            < plan.arms_deadline_s
            < plan.analysis_deadline_s
            < plan.budget_s
        )
    assert gpu_plan().budget_s == 480.0


def test_base_steps_arms_and_the_base_deadline() -> None:
    plan = with_overrides(gpu_plan(), base_steps=(240, 40), arms=("b", "e"))
    assert plan.all_base_overrides[-2:] == (
        "recipe.stages.0.steps=240",
        "recipe.stages.1.steps=40",
    )
    assert gpu_plan().all_base_overrides == ()
    assert [j.name for j in arm_jobs(plan)] == ["b_s1", "e_s1", "b_s2", "b_s3"]
    # The base is asked to stop early enough for what follows it to keep its reserve.
    full = gpu_plan()
    assert full.base_deadline_s == full.arms_deadline_s - full.stop_grace_s
    base_only = with_overrides(full, stop_after="base", budget_s=510.0)
    assert base_only.base_deadline_s == pytest.approx(
        510.0 - base_only.report_reserve_s - base_only.base_reserve_s - base_only.stop_grace_s
    )
