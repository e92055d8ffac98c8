"""The Table-3 protocol's plan (issue #24): arms, seeds, Hydra overrides, budgets, step sizing.

Pure Python (no torch): the driver (``table3.py``) builds a :class:`Plan` for its mode, and
the unit tests check the job list, the overrides and the sizing without a model.

Arms (all from the same base, ``configs/experiment/table3_arm.yaml`` + the overrides below):

====  ======================================  ==============  ========  ==========================
arm   IndexCache                              indexer loss    warm-up   what it stands for
====  ======================================  ==============  ========  ==========================
a     all Full (``indexcache=off``)            own layer       yes       the reference
b     freq 4 / offset 1 (``FSSSFSSS``)         L_multi         yes       the product
c     freq 4 / offset 1                        own layer       yes       "w/o cross-layer loss"
d     freq 4 / offset 1                        none            no        training-free reuse
e     greedy-searched, same number of Full    none            no        searched, training-free
====  ======================================  ==============  ========  ==========================

Every arm trains the trunk for the same number of sparse steps S with the same learning-rate
schedule; (a)-(c) first run W dense warm-up steps of their indexers (trunk frozen). ``distill=
none`` has no indexer loss, so the trainer refuses a warm-up stage for (d) and (e): they run the
sparse stage alone. Per seed, every run reads the same shuffled data from its first sample, so
(a)-(c) share their whole data order; (d)/(e)'s sparse stage starts at the seed's first sample
where (a)-(c)'s starts W batches later (the trainer has no option to skip samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

#: Warm-up step time / dense pretraining step time on small_glm5 at 8K, 4 sequences per step
#: (docs/benchmarks.md, issue #12: 0.446 s vs 0.714 s): the warm-up runs the trunk forward only.
WARMUP_OVER_DENSE = 0.65

BASE_NAME = "base"
#: The share schedule of arms b-d; the search for (e) keeps as many Full layers.
FREQ4 = ("indexcache=freq4", "indexcache.index_skip_topk_offset=1")


@dataclass(frozen=True)
class Arm:
    """One arm of the table."""

    key: str
    label: str
    indexcache: tuple[str, ...]
    distill: str
    warmup: bool


ARMS: dict[str, Arm] = {
    a.key: a
    for a in (
        Arm("a", "all-Full, own-layer loss (reference)", ("indexcache=off",), "own_layer", True),
        Arm("b", "freq 4 + L_multi", FREQ4, "multi", True),
        Arm("c", "freq 4 + own-layer loss", FREQ4, "own_layer", True),
        Arm("d", "freq 4, training-free", FREQ4, "none", False),
        Arm("e", "searched pattern, training-free", (), "none", False),
    )
}


@dataclass(frozen=True)
class EvalSpec:
    """The held-out evaluation of every checkpoint (``python -m indexcache_train.tools eval``)."""

    seq: int
    docs: int
    buckets: str
    copy_distances: str
    copy_span: int
    probe_samples: int
    dtype: str
    #: HF check: this many of the same documents, cut to ``hf_seq + 1`` tokens.
    hf_docs: int
    hf_seq: int
    #: Greedy search calibration: batches x 1 sequence of ``search_seq + 1`` train tokens.
    search_batches: int
    search_seq: int


@dataclass(frozen=True)
class Plan:
    """Everything that decides what runs, how long it may take and how it is measured."""

    mode: str
    seeds: tuple[int, ...]
    e_seeds: int
    concurrency: int
    budget_s: float
    #: After the base's deadline signal (SIGTERM) it has this long to save and exit.
    stop_grace_s: float
    #: ``stop_after="base"``: kept after the base for its analysis (export, search, evals).
    base_reserve_s: float
    tail_reserve_s: float
    report_reserve_s: float
    #: Arm steps: fixed (W, S), or None to size S from the base's measured speed.
    arm_steps: tuple[int, int] | None
    sparse_bounds: tuple[int, int]
    warmup_ratio: float
    pack_factor: float
    eval_points: int
    eval: EvalSpec
    #: Hydra overrides for every training job (smoke: the toy model and data).
    common: tuple[str, ...] = ()
    base_overrides: tuple[str, ...] = ()
    warmup_end_eval: bool = True
    #: Train (e) even when the search returns freq 4's own pattern (then (e) repeats (d)).
    train_e_if_same: bool = False
    #: The arms to train (``--arms``), in :data:`ARMS` order.
    arms: tuple[str, ...] = tuple(ARMS)
    #: The base's dense and sparse stage steps (``--base-steps``); None: the config's.
    base_steps: tuple[int, int] | None = None
    #: ``"base"``: stop after the base and its analysis (``--stop-after``); None: everything.
    stop_after: str | None = None
    #: Reuse a completed base of the same fingerprint found in the work dir (``--reuse-base``).
    reuse_base: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def arms_deadline_s(self) -> float:
        return self.budget_s - self.tail_reserve_s - self.report_reserve_s

    @property
    def base_deadline_s(self) -> float:
        """When a base still training is asked to stop (SIGTERM: it saves at the next step
        boundary and exits within ``stop_grace_s``): derived from the budget so that what
        follows it (the base's analysis, or the arms) keeps its reserve."""
        if self.stop_after == "base":
            after = self.analysis_deadline_s - self.base_reserve_s
        else:
            after = self.arms_deadline_s
        return after - self.stop_grace_s

    @property
    def all_base_overrides(self) -> tuple[str, ...]:
        """The base's Hydra overrides, ``base_steps`` last (they win)."""
        if self.base_steps is None:
            return self.base_overrides
        dense, sparse = self.base_steps
        return (
            *self.base_overrides,
            f"recipe.stages.0.steps={dense}",
            f"recipe.stages.1.steps={sparse}",
        )

    @property
    def analysis_deadline_s(self) -> float:
        return self.budget_s - self.report_reserve_s


GPU_EVAL = EvalSpec(
    seq=8192,
    docs=8,
    buckets="0,512,1K,2K,4K",
    copy_distances="32,128,512,1024,2048,4096,8000",
    copy_span=32,
    probe_samples=4,
    dtype="bfloat16",
    hf_docs=4,
    hf_seq=4096,
    search_batches=2,
    search_seq=8192,
)

SMOKE_EVAL = EvalSpec(
    seq=128,
    docs=2,
    buckets="0,8,32,64",
    copy_distances="16,64",
    copy_span=8,
    probe_samples=2,
    dtype="float32",
    hf_docs=2,
    hf_seq=64,
    search_batches=1,
    search_seq=64,
)

#: The toy the smoke test trains on CPU: glm5_toy with 8 layers (freq 4 keeps 2 Full, so the
#: search has a choice), dense MLPs, top-8 of 128 tokens (1/8 of the ~64 average causal keys).
SMOKE_COMMON = (
    "model=glm5_toy",
    "data=default",
    "model.seq_length=128",
    "model.num_mtp_layers=0",
    "++model.overrides.num_hidden_layers=8",
    "++model.overrides.first_k_dense_replace=8",
    "++model.overrides.index_topk=8",
    "optim.bf16=false",
    "optim.micro_batch_size=2",
    "optim.global_batch_size=2",
    "data.num_workers=0",
    # table3_base's 16 spans of 64 would overwrite a 129-token sample many times over.
    "data.repeat_span=8",
)
SMOKE_BASE = (
    "recipe.stages.0.steps=4",
    "recipe.stages.0.warmup_steps=1",
    "recipe.stages.1.steps=2",
    "recipe.stages.1.warmup_steps=0",
    "logging.eval_interval=4",
)


#: ``--stop-after base`` on the device: the base and its analysis only, so the budget may run
#: closer to table3.sh's 540 s limit (no arm can be cut mid-save).
GPU_BASE_ONLY_BUDGET_S = 510.0


def gpu_plan(budget_s: float = 480.0) -> Plan:
    """One H100: 3 seeds of (a)-(d), one of (e), 3 training jobs at once (~16 GB each; 4 may
    fit an 80 GB card beside the analysis), S sized to the budget."""
    return Plan(
        mode="gpu",
        seeds=(1, 2, 3),
        e_seeds=1,
        concurrency=3,
        budget_s=budget_s,
        # #24's first run: the final save took 7 s, the stage-end one 18 s, exit ~12 s.
        stop_grace_s=40.0,
        # #24's first run: export 2 s, search 13 s, base evaluation 43 s (beside 3 arms).
        base_reserve_s=60.0,
        tail_reserve_s=45.0,
        report_reserve_s=12.0,
        arm_steps=None,
        sparse_bounds=(4, 60),
        warmup_ratio=1.0,
        pack_factor=1.3,
        eval_points=2,
        eval=GPU_EVAL,
    )


def smoke_plan(budget_s: float = 600.0) -> Plan:
    """CPU, toy size: every phase once (1 seed, 2 + 2 arm steps)."""
    return Plan(
        mode="smoke",
        seeds=(1,),
        e_seeds=1,
        concurrency=2,
        budget_s=budget_s,
        stop_grace_s=30.0,
        base_reserve_s=90.0,
        tail_reserve_s=60.0,
        report_reserve_s=15.0,
        arm_steps=None,
        sparse_bounds=(2, 2),
        warmup_ratio=1.0,
        pack_factor=1.3,
        eval_points=1,  # evaluations at 0, W and the end: fewer CPU seconds
        eval=SMOKE_EVAL,
        common=SMOKE_COMMON,
        base_overrides=SMOKE_BASE,
        train_e_if_same=True,  # the smoke runs every arm's training path
    )


# ---------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    """One training run of an arm (``name`` = ``<arm>_s<seed>``)."""

    name: str
    arm: str
    seed: int


def arm_jobs(plan: Plan) -> list[Job]:
    """Launch order: (a)-(d) seed by seed, (e)'s seeds after the first round of (a)-(d) (it
    waits for the search) and after the last; a budget cut drops the tail first."""
    jobs: list[Job] = []
    e_left = list(plan.seeds[: plan.e_seeds]) if "e" in plan.arms else []
    for i, seed in enumerate(plan.seeds):
        jobs += [Job(f"{k}_s{seed}", k, seed) for k in "abcd" if k in plan.arms]
        if i == 0 and e_left:
            s = e_left.pop(0)
            jobs.append(Job(f"e_s{s}", "e", s))
    jobs += [Job(f"e_s{s}", "e", s) for s in e_left]
    return jobs


def stage_override(stage: dict) -> str:
    """A one-stage ``recipe.stages=[...]`` Hydra override from a composed stage's fields."""
    body = ", ".join(f"{k}: {stage[k]}" for k in stage if stage[k] is not None)
    return f"recipe.stages=[{{{body}}}]"


def job_overrides(
    job: Job, warmup: int, sparse: int, interval: int, sparse_stage: dict, pattern: str | None
) -> list[str]:
    """The Hydra overrides of one arm run on top of ``+experiment=table3_arm``.

    Args:
        job: The run.
        warmup: W (ignored by arms without a warm-up).
        sparse: S.
        interval: ``logging.eval_interval``.
        sparse_stage: The arm config's sparse stage (composed) for the arms without a warm-up.
        pattern: The searched F/S pattern (arm e).
    """
    arm = ARMS[job.arm]
    out = [*arm.indexcache, f"distill={arm.distill}", f"run.seed={job.seed}"]
    if job.arm == "e":
        if not pattern:
            raise ValueError("arm e needs the searched pattern")
        out += [
            "indexcache=pattern",
            f"indexcache.index_topk_pattern={pattern}",
            "indexcache.index_skip_topk_offset=null",
        ]
    if arm.warmup:
        out += [f"recipe.stages.0.steps={warmup}", f"recipe.stages.1.steps={sparse}"]
    else:
        out.append(stage_override({**sparse_stage, "steps": sparse}))
    out.append(f"logging.eval_interval={interval}")
    return out


# ---------------------------------------------------------------------- sizing
@dataclass(frozen=True)
class Speeds:
    """What the base run measured (seconds)."""

    dense_step_s: float
    sparse_step_s: float
    overhead_s: float


@dataclass(frozen=True)
class Sizing:
    """The arm step counts and the prediction they came from."""

    warmup: int
    sparse: int
    interval: int
    predicted_s: float | None
    window_s: float | None
    fits: bool
    fixed: bool

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def eval_interval(warmup: int, sparse: int, points: int) -> int:
    """``logging.eval_interval`` giving ``points`` evaluations in the sparse stage and one at the
    end of the warm-up (the trainer evaluates at multiples of the interval and at the end)."""
    step = max(1, sparse // max(1, points))
    return math.gcd(warmup, step) if warmup else step


def _warmup_for(plan: Plan, sparse: int) -> int:
    return max(1, round(plan.warmup_ratio * sparse)) if plan.warmup_ratio > 0 else 0


def job_gpu_seconds(plan: Plan, speeds: Speeds, arm: str, warmup: int, sparse: int) -> float:
    """One arm run's device time at the base's single-job speed, times ``pack_factor``
    (evaluations, saves, GPU time slicing and the analysis worker's share)."""
    t_warm = WARMUP_OVER_DENSE * speeds.dense_step_s
    steps = sparse * speeds.sparse_step_s + (warmup * t_warm if ARMS[arm].warmup else 0.0)
    return plan.pack_factor * steps


def predicted_wall_s(
    plan: Plan, speeds: Speeds, jobs: list[Job], warmup: int, sparse: int
) -> float:
    """Wall time of the arms: their device time one after the other (jobs sharing the GPU are
    time-sliced, so running several at once mostly hides start-up, not compute), plus one job's
    fixed overhead (the first start-up and the last save are not overlapped)."""
    gpu = sum(job_gpu_seconds(plan, speeds, j.arm, warmup, sparse) for j in jobs)
    return gpu + speeds.overhead_s


def size_arms(plan: Plan, speeds: Speeds | None, window_s: float | None, jobs: list[Job]) -> Sizing:
    """The largest even S in ``plan.sparse_bounds`` whose predicted wall time fits the window
    (W = ``warmup_ratio`` x S); the lower bound when nothing fits (reported as not fitting:
    the deadline guard then cuts the tail). Fixed ``plan.arm_steps`` skip the prediction."""
    if plan.arm_steps is not None:
        w, s = plan.arm_steps
        return Sizing(w, s, eval_interval(w, s, plan.eval_points), None, window_s, True, True)
    if speeds is None or window_s is None:
        raise ValueError("sizing needs the base's measured speeds and the time window")
    lo, hi = plan.sparse_bounds
    candidates = [s for s in range(hi, lo - 1, -1) if s % 2 == 0 or s == lo]
    pred = None
    for s in candidates:
        w = _warmup_for(plan, s)
        pred = predicted_wall_s(plan, speeds, jobs, w, s)
        if pred <= window_s:
            return Sizing(w, s, eval_interval(w, s, plan.eval_points), pred, window_s, True, False)
    w = _warmup_for(plan, lo)
    return Sizing(w, lo, eval_interval(w, lo, plan.eval_points), pred, window_s, False, False)


def with_overrides(plan: Plan, **changes) -> Plan:
    """A copy of ``plan`` with fields replaced (CLI flags)."""
    return replace(plan, **changes)
