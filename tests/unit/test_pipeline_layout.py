"""Issue #6: pipeline layouts that respect IndexCache share groups (guard, auto layout, CLI).

Megatron-Core 0.19.2 is the oracle for everything format-related: every layout string we emit is
parsed by its ``PipelineParallelLayerLayout`` and must build exactly the layers we think, and our
mirror of its even/uneven split must match ``get_transformer_layer_offset``.
"""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest

from indexcache_train.parallel import (
    EVEN,
    LayerCosts,
    PipelineLayout,
    PipelineLayoutError,
    auto_layout,
    check_layout,
    find_violations,
    format_layout,
    layout_from_str,
    megatron_split,
    parse_layout_str,
    partition_min_max,
    resolve_pipeline_layout,
    share_units,
    unit_costs,
)
from indexcache_train.schedule import IndexCacheSchedule
from indexcache_train.tools.__main__ import main

GLM5_SEARCHED = "FFSFSSSFSSFSFSSSSSSSFSSSSSSFSSSFSFSSSSFFFFFSSSFFSSSFSSSSSSSSFSSSFSSSSSSFSFSSSS"
# Explicit (not the defaults) so a change of LayerCosts' defaults cannot move pinned layouts.
GLM_COSTS = LayerCosts(
    moe_layer=1.0,
    dense_layer=0.8,
    indexer=0.25,
    embedding=0.1,
    loss=1.5,
    mtp_extra=1.7,
    first_k_dense_replace=3,
)


@pytest.fixture(scope="module")
def glm52() -> IndexCacheSchedule:
    s = IndexCacheSchedule.from_freq_offset(78, 4, 3, num_mtp_layers=1)
    # The premise of every GLM-5.2 test (facts section 2).
    assert s.full_layers == (0, 1, 2, *range(6, 75, 4), 78)
    return s


# ---------------------------------------------------------------- oracles
def megatron_chunks(layout: str, pp: int, num_layers: int, num_mtp: int) -> list[tuple[int, ...]]:
    """Global layer ids per chunk (flattened order) as Megatron-Core's own layout class sees them."""
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.pipeline_parallel_layer_layout import (
        PipelineParallelLayerLayout,
    )

    parsed = PipelineParallelLayerLayout(layout, pp)
    parsed.validate_layer_layout(num_layers=num_layers, mtp_num_layers=num_mtp)
    vpp = parsed.virtual_pipeline_model_parallel_size
    saved = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    parallel_state.set_virtual_pipeline_model_parallel_world_size(vpp if vpp > 1 else None)
    try:
        chunks = []
        for v, r in itertools.product(range(vpp), range(pp)):
            trunk = parsed.get_layer_id_list(LayerType.decoder, vp_stage=v, pp_rank=r)
            mtp = parsed.get_layer_id_list(LayerType.mtp, vp_stage=v, pp_rank=r)
            chunks.append(tuple(trunk) + tuple(num_layers + k for k in mtp))
    finally:
        parallel_state.set_virtual_pipeline_model_parallel_world_size(saved)
    return chunks


def greedy_chunks_needed(weights: list[float], cap: float) -> float:
    """Fewest chunks whose costs stay <= cap (inf if a unit alone exceeds it): an independent
    certificate that no split has a cheaper slowest chunk."""
    count, load = 1, 0.0
    for w in weights:
        if w > cap:
            return float("inf")
        if load + w > cap:
            count, load = count + 1, 0.0
        load += w
    return count


def assert_valid_and_balanced(
    schedule: IndexCacheSchedule, layout: PipelineLayout, costs: LayerCosts
) -> None:
    """The layout builds in Megatron, starts every chunk on a Full layer, and is optimally balanced."""
    text = layout.to_megatron()
    pp = layout.pipeline_model_parallel_size
    assert megatron_chunks(text, pp, schedule.num_layers, schedule.num_mtp_layers) == list(
        layout.chunks
    )
    assert sum(len(c) for c in layout.chunks) == schedule.num_layers + schedule.num_mtp_layers
    assert all(schedule.is_full(chunk[0]) for chunk in layout.chunks), text
    assert find_violations(schedule, layout) == []
    chunk_costs = layout.chunk_costs(schedule, costs)
    units = unit_costs(schedule, costs)
    w_max = max(units)
    # The stated guarantee: optimal slowest chunk, <= mean + heaviest unit; spread <= heaviest unit.
    assert max(chunk_costs) <= sum(chunk_costs) / len(chunk_costs) + w_max + 1e-9
    assert max(chunk_costs) - min(chunk_costs) <= w_max + 1e-9
    assert greedy_chunks_needed(units, max(chunk_costs) - 1e-6) > layout.num_chunks


# ---------------------------------------------------------------- auto layout: GLM-5.2
@pytest.mark.parametrize("pp", [2, 4, 8, 13])
def test_glm52_auto_layout_is_valid_balanced_and_builds_in_megatron(glm52, pp):
    layout = auto_layout(glm52, pp, costs=GLM_COSTS)
    assert layout.num_chunks == pp
    assert_valid_and_balanced(glm52, layout, GLM_COSTS)
    assert resolve_pipeline_layout(glm52, pp, costs=GLM_COSTS) == layout.to_megatron()


def test_glm52_pp8_layout_string_and_spread(glm52):
    layout = auto_layout(glm52, 8, costs=GLM_COSTS)
    assert layout.to_megatron() == "Et*10|t*12|t*8|t*12|t*12|t*8|t*12|t*4mL"
    chunk_costs = layout.chunk_costs(glm52, GLM_COSTS)
    # The spread is one 4-layer MoE share group (F 1.25 + 3 S); the bound w_max is the heaviest
    # unit, the Full MTP layer's own unit plus the loss (1.0 + 0.25 + 1.7 + 1.5 = 4.45).
    assert max(chunk_costs) - min(chunk_costs) == pytest.approx(4.25)
    assert max(unit_costs(glm52, GLM_COSTS)) == pytest.approx(4.45)


def test_auto_layout_is_optimal_over_every_valid_layer_split():
    # Independent of share_units: enumerate *every* split at any layer (and an MTP-only last
    # chunk), keep those the guard accepts, and compare the best slowest chunk.
    rng = random.Random(6)
    for _ in range(25):
        pattern = "F" + "".join(rng.choice("FSS") for _ in range(9)) + rng.choice("FS")
        schedule = IndexCacheSchedule.from_pattern(pattern, 10, num_mtp_layers=1)
        costs = LayerCosts(
            indexer=rng.uniform(0, 1), mtp_extra=rng.uniform(0, 6), loss=rng.uniform(0, 3),
            first_k_dense_replace=rng.randint(0, 3),
        )  # fmt: skip
        for parts in range(2, 5):
            best = min(
                (max(c.chunk_costs(schedule, costs)) for c in _all_splits(schedule, parts)
                 if not find_violations(schedule, c)),
                default=None,
            )  # fmt: skip
            if best is None:
                with pytest.raises(PipelineLayoutError, match="share groups"):
                    auto_layout(schedule, parts, costs=costs)
                continue
            got = auto_layout(schedule, parts, costs=costs)
            assert max(got.chunk_costs(schedule, costs)) == pytest.approx(best), pattern


def _all_splits(schedule: IndexCacheSchedule, parts: int):
    n, mtp = schedule.num_layers, (schedule.num_layers,)
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = [0, *cuts, n]
        chunks = [tuple(range(a, b)) for a, b in itertools.pairwise(bounds)]
        yield PipelineLayout((*chunks[:-1], chunks[-1] + mtp), parts, n)
    for cuts in itertools.combinations(range(1, n), parts - 2):
        bounds = [0, *cuts, n]
        chunks = [tuple(range(a, b)) for a, b in itertools.pairwise(bounds)]
        yield PipelineLayout((*chunks, mtp), parts, n)


def test_partition_min_max_matches_brute_force_lexicographic_objective():
    rng = random.Random(0)
    for _ in range(300):
        m = rng.randint(1, 8)
        parts = rng.randint(1, m)
        weights = [rng.uniform(0, 10) for _ in range(m)]
        head, tail = rng.uniform(0, 3), rng.uniform(0, 5)

        def costs(cuts, weights=weights, head=head, tail=tail, m=m):
            return [
                sum(weights[a:b]) + (head if a == 0 else 0) + (tail if b == m else 0)
                for a, b in itertools.pairwise(cuts)
            ]

        def key(c):
            return (round(max(c), 9), -round(min(c), 9), round(sum(x * x for x in c), 9))

        brute = min(
            (costs([0, *cc, m]) for cc in itertools.combinations(range(1, m), parts - 1)), key=key
        )
        assert key(costs(partition_min_max(weights, parts, head, tail))) == key(brute)


# ---------------------------------------------------------------- the guard
def test_even_split_on_8_stages_is_refused_naming_layers(glm52):
    # 78 layers do not divide by 8; the "plain even split" Megatron can build is 10 per stage
    # with 8 on the last: stages 2, 4, 6 then start on Shared layers 20, 40, 60.
    with pytest.raises(PipelineLayoutError) as err:
        resolve_pipeline_layout(glm52, 8, last=8, costs=GLM_COSTS)
    msg = str(err.value)
    for stage, layers, source in ((2, "20, 21", 18), (4, "40, 41", 38), (6, "60, 61", 58)):
        assert (
            f"pipeline stage {stage}: layers {layers} reuse the top-k of layer {source} on "
            f"pipeline stage {stage - 1}" in msg
        )
    assert "layer 10" not in msg and "layer 30 " not in msg  # Full starts are fine
    proposal = msg.split('pipeline_model_parallel_layout="')[1].split('"')[0]
    assert proposal == auto_layout(glm52, 8, costs=GLM_COSTS).to_megatron()
    # The same split written as a layout string is refused the same way.
    with pytest.raises(PipelineLayoutError, match=r"layers 40, 41 reuse the top-k of layer 38"):
        resolve_pipeline_layout(glm52, 8, layout="Et*10|(t*10|)*6,t*8mL")
    # Megatron's own even split cannot divide 78 by 8: refused, with the valid proposal.
    with pytest.raises(PipelineLayoutError, match=r"do not divide into 8 stages.*Et\*10\|"):
        resolve_pipeline_layout(glm52, 8, layout=EVEN, costs=GLM_COSTS)


def test_even_split_on_2_stages_is_refused_and_valid_splits_pass(glm52):
    with pytest.raises(PipelineLayoutError, match=r"stage 1: layers 39, 40, 41 reuse .* layer 38"):
        resolve_pipeline_layout(glm52, 2, layout=EVEN)
    # Boundaries on Full layers pass; uneven splits come back as explicit layout strings.
    assert resolve_pipeline_layout(glm52, 2, first=42) == "Et*42|t*36mL"
    assert resolve_pipeline_layout(glm52, 2, layout="Et*38|t*40mL") == "Et*38|t*40mL"
    assert resolve_pipeline_layout(glm52, 1) is None


@pytest.mark.parametrize(
    ("pp", "vpp", "first", "last"),
    [
        (2, None, None, None),
        (4, None, 18, None),
        (4, 2, 18, None),
        (3, None, 30, 22),
        (2, 3, None, None),
    ],
)
def test_megatron_split_matches_megatron_offsets(pp, vpp, first, last):
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    n = 78
    cfg = SimpleNamespace(
        num_layers=n,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        pipeline_model_parallel_layout=None,
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
        account_for_embedding_in_pipeline_split=False,
        account_for_loss_in_pipeline_split=False,
    )
    want = []
    for v, r in itertools.product(range(vpp or 1), range(pp)):
        vp = v if vpp else None
        start = get_transformer_layer_offset(cfg, vp_stage=vp, pp_rank=r)
        want.append(
            tuple(range(start, start + get_num_layers_to_build(cfg, vp_stage=vp, pp_rank=r)))
        )
    want[-1] += (n,)  # Megatron puts MTP on the last stage when no layout string is given
    schedule = IndexCacheSchedule.all_full(n, 1)
    assert megatron_split(schedule, pp, vpp, first, last).chunks == tuple(want)


def test_virtual_stages_follow_the_same_rule(glm52):
    layout = auto_layout(glm52, 4, 2, costs=GLM_COSTS)
    assert layout.virtual_pipeline_model_parallel_size == 2
    assert_valid_and_balanced(glm52, layout, GLM_COSTS)
    # Even interleaved split: 39 per rank / 3 = 13 per chunk; chunk boundaries 13, 39, 52, 65
    # fall on Shared layers.
    with pytest.raises(PipelineLayoutError) as err:
        resolve_pipeline_layout(glm52, 2, 3, layout=EVEN)
    msg = str(err.value)
    assert "pipeline stage 1 / virtual stage 0: layer 13 reuses the top-k of layer 10" in msg
    assert (
        "pipeline stage 1 / virtual stage 1: layers 39, 40, 41 reuse the top-k of layer 38" in msg
    )
    with pytest.raises(PipelineLayoutError, match="virtual_pipeline_model_parallel_size=2"):
        resolve_pipeline_layout(glm52, 2, 2, layout="Et*42|t*36mL")  # 2 chunks, not 4


# ---------------------------------------------------------------- custom patterns, MTP
@pytest.mark.parametrize(("pp", "vpp"), [(2, None), (4, None), (8, None), (4, 2)])
def test_searched_glm5_pattern_gets_valid_balanced_layouts(pp, vpp):
    schedule = IndexCacheSchedule.from_pattern(GLM5_SEARCHED, 78, num_mtp_layers=1)
    layout = auto_layout(schedule, pp, vpp, costs=GLM_COSTS)
    assert_valid_and_balanced(schedule, layout, GLM_COSTS)


def test_shared_mtp_layer_forces_its_source_onto_the_last_stage():
    # freq 2 / offset 2: trunk Full = {0, 1, 3, ..., 77}; MTP layer 78 is Shared, source 77.
    # (freq 2 / offset 1 makes 78 Full: max(78 - 1 + 1, 0) % 2 == 0.)
    shared_mtp = IndexCacheSchedule.from_freq_offset(78, 2, 2, num_mtp_layers=1)
    full_mtp = IndexCacheSchedule.from_freq_offset(78, 2, 1, num_mtp_layers=1)
    assert shared_mtp.source(78) == 77 and full_mtp.is_full(78)
    # An MTP depth costing ~10 layers would sit alone on the last stage if it could.
    costs = LayerCosts(mtp_extra=9.0, first_k_dense_replace=3)
    assert auto_layout(full_mtp, 8, costs=costs).chunks[-1] == (78,)
    layout = auto_layout(shared_mtp, 8, costs=costs)
    assert {77, 78} <= set(layout.chunks[-1])
    assert_valid_and_balanced(shared_mtp, layout, costs)
    assert share_units(shared_mtp)[-1] == (77, 78)
    with pytest.raises(PipelineLayoutError, match=r"MTP layer 78 reuses the top-k of layer 77 on"):
        resolve_pipeline_layout(shared_mtp, 2, layout="Et*78|mL")


# ---------------------------------------------------------------- impossible requests
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(pp_size=23), r"23 pipeline chunks .* on 22 share groups"),
        (dict(pp_size=12, vpp_size=2), r"24 pipeline chunks"),
        (dict(pp_size=0), r"pipeline_model_parallel_size must be an integer >= 1"),
        (dict(pp_size=-2), r"pipeline_model_parallel_size must be an integer >= 1"),
        (dict(pp_size=2, vpp_size=0), r"virtual_pipeline_model_parallel_size must be"),
        (dict(pp_size=1, vpp_size=2), r"needs pipeline_model_parallel_size > 1"),
        (dict(pp_size=2, layout="Et*42|t*35mL"), r"77 transformer layers 't' \(the model has 78\)"),
        (dict(pp_size=2, layout="Et*42|t*36L"), r"0 MTP layers 'm' \(the model has 1\)"),
        (dict(pp_size=3, layout="Et*42|t*36mL"), r"has 2 stages .* needs a multiple of 3"),
        (dict(pp_size=2, layout="Et*42|t*36mLx"), r"unknown character"),
        (dict(pp_size=2, layout="t*42|Et*36mL"), r"must start with the embedding"),
        (dict(pp_size=2, layout="Et*42|t*36mL", first=42), r"cannot be combined"),
        (dict(pp_size=2, first=0), r"num_layers_in_first_pipeline_stage must be an integer >= 1"),
        (dict(pp_size=3, first=40, last=38), r"0 layers are left for 1 middle"),
    ],
)
def test_impossible_requests_fail_clearly(glm52, kwargs, match):
    with pytest.raises(PipelineLayoutError, match=match):
        resolve_pipeline_layout(glm52, **kwargs)


def test_wrong_layer_count_error_proposes_a_valid_layout(glm52):
    with pytest.raises(PipelineLayoutError, match=r'Valid, cost-balanced layout .*="Et\*'):
        resolve_pipeline_layout(glm52, 2, layout="Et*40|t*36mL")


def test_layer_costs_are_validated():
    with pytest.raises(PipelineLayoutError, match="indexer=-1"):
        LayerCosts(indexer=-1)
    with pytest.raises(PipelineLayoutError, match="must be a number"):
        LayerCosts(loss="1")


def test_check_layout_accepts_auto_and_refuses_a_foreign_schedule(glm52):
    layout = auto_layout(glm52, 4, costs=GLM_COSTS)
    check_layout(glm52, layout)
    with pytest.raises(PipelineLayoutError, match="schedule has 10"):
        find_violations(IndexCacheSchedule.all_full(10, 1), layout)


# ---------------------------------------------------------------- the string format
@pytest.mark.parametrize(
    "text",
    [
        "Et*3|(tt|)*29,m|L",
        "E|(tt|)*2,(t|)*4,mL",
        "(t*2|)*3",
        "Et*10|t*12|t*8|t*12|t*12|t*8|t*12|t*4mL",
        "EttLm",
        "|E|",
    ],
)
def test_parser_agrees_with_megatron(text):
    from megatron.core.transformer.pipeline_parallel_layer_layout import (
        PipelineParallelLayerLayout,
    )

    chars = {"embedding": "E", "decoder": "t", "mtp": "m", "loss": "L"}
    theirs = [
        [chars[t.name] for t in chunk]
        for chunk in PipelineParallelLayerLayout.parse_str_to_list(text)
    ]
    assert parse_layout_str(text) == theirs
    assert parse_layout_str(format_layout(theirs)) == theirs


# ---------------------------------------------------------------- the CLI
def test_cli_layout_glm52_pp8(capsys, glm52):
    assert main(["layout", "--model", "glm5.2", "--pp", "8"]) == 0
    out = capsys.readouterr().out
    expected = resolve_pipeline_layout(glm52, 8, costs=LayerCosts(first_k_dense_replace=3))
    assert f"pipeline_model_parallel_layout: {expected}\n" in out
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert [row[0] for row in rows] == [str(r) for r in range(8)]
    assert rows[0][2:4] == ["E", "0-9"] and rows[-1][-6:-4] == ["m78", "L"]
    starts = [int(row[2 if row[2] != "E" else 3].split("-")[0]) for row in rows]
    assert all(glm52.is_full(i) for i in starts)
    assert sum(int(row[-4]) for row in rows) == 79  # n column: 78 trunk + 1 MTP
    slowest = max(
        auto_layout(glm52, 8, costs=LayerCosts(first_k_dense_replace=3)).chunk_costs(
            glm52, LayerCosts(first_k_dense_replace=3)
        )
    )
    assert f"max {slowest:.2f}" in out


def test_cli_refuses_a_bad_split_and_reads_hf_configs(capsys, tmp_path):
    assert main(["layout", "--model", "glm5.2", "--pp", "8", "--last", "8"]) == 2
    assert "layers 20, 21 reuse the top-k of layer 18" in capsys.readouterr().err
    config = {
        "num_hidden_layers": 12,
        "first_k_dense_replace": 1,
        "num_nextn_predict_layers": 1,
        "index_topk_freq": 3,
        "index_skip_topk_offset": 1,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["layout", "--model", str(tmp_path), "--pp", "2", "--vpp", "2"]) == 0
    out = capsys.readouterr().out
    # Full = {0, 3, 6, 9} (+ MTP 12 Full): 5 units, 4 chunks.
    assert "freq 3 / offset 1" in out
    text = out.split("pipeline_model_parallel_layout: ")[1].split()[0]
    assert len(parse_layout_str(text)) == 4
    assert main(["layout", "--model", "glm5", "--pp", "4", "--pattern", GLM5_SEARCHED]) == 0
    assert "custom pattern: 22/78" in capsys.readouterr().out
    assert main(["layout", "--model", "no-such-model", "--pp", "2"]) == 2
    assert "is not a preset" in capsys.readouterr().err
    assert main(["layout", "--model", "glm5", "--pp", "2", "--freq", "4"]) == 2
    assert "--freq needs --offset" in capsys.readouterr().err


def test_cli_subprocess_smoke_without_torch(subprocess_env):
    code = (
        "import sys; from indexcache_train.tools.__main__ import main; rc = main(sys.argv[1:]); "
        "assert not {'torch', 'megatron'} & set(m.split('.')[0] for m in sys.modules); "
        "sys.exit(rc)"
    )
    args = ["layout", "--model", "deepseek-v3.2", "--pp", "4"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], env=subprocess_env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "pipeline_model_parallel_layout: Et*" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "indexcache_train.tools", *args],
        env=subprocess_env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        layout_from_str(
            proc.stdout.split("pipeline_model_parallel_layout: ")[1].split()[0],
            IndexCacheSchedule.all_full(61, 1),
            4,
        ).num_chunks
        == 4
    )
