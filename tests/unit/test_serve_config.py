"""``serve-config``: per-engine overrides parse as JSON, round-trip through the schedule module and
build the same ``indexer_types`` in transformers 5.17; bad input exits 2 before writing."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from indexcache_train.model.presets import preset_hf_config
from indexcache_train.model.toy_configs import glm5_toy_hf_config
from indexcache_train.schedule import IndexCacheSchedule, ScheduleError, rule_is_full
from indexcache_train.schedule.hf_keys import ENGINE_DEFAULT_OFFSET, SCHEDULE_KEYS
from indexcache_train.tools import serve_config
from indexcache_train.tools.__main__ import main
from indexcache_train.tools.serve_config import (
    ENGINES,
    check_round_trip,
    serve_overrides,
)

pytestmark = pytest.mark.unit

# Paper's greedy-searched GLM-5 pattern (facts section 2): 22 of 78 layers Full.
GLM5_SEARCHED = "FFSFSSSFSSFSFSSSSSSSFSSSSSSFSSSFSFSSSSFFFFFSSSFFSSSFSSSSSSSSFSSSFSSSSSSFSFSSSS"
# GLM-5.2 (facts section 2): Full = {0, 1, 2, 6, 10, ..., 74}, MTP layer 78 Full.
GLM52_FULL = {0, 1, 2, *range(6, 78, 4), 78}

CASES = {
    "glm5.2-freq4-off3": lambda: IndexCacheSchedule.from_freq_offset(78, 4, 3, 1),
    "freq2-off1": lambda: IndexCacheSchedule.from_freq_offset(78, 2, 1, 1),
    "custom-pattern": lambda: IndexCacheSchedule.from_pattern(GLM5_SEARCHED, 78, 1),
    # The rule makes the MTP layer (global 5) Shared: config keys must still carry that.
    "shared-mtp": lambda: IndexCacheSchedule.from_freq_offset(5, 2, 1, 1),
}


@pytest.fixture(params=sorted(CASES))
def schedule(request) -> IndexCacheSchedule:
    return CASES[request.param]()


def _from_keys(schedule: IndexCacheSchedule, keys: dict) -> IndexCacheSchedule:
    """Rebuild through our own YAML path (no default offset allowed there)."""
    return IndexCacheSchedule.from_keys(
        schedule.num_layers,
        schedule.num_mtp_layers,
        **{k: keys[k] for k in SCHEDULE_KEYS},
    )


# ---------------------------------------------------------------------- pure module
def test_every_engine_dict_is_json_and_round_trips(schedule):
    overrides = serve_overrides(schedule)
    assert set(overrides) == set(ENGINES)
    for engine, keys in overrides.items():
        assert json.loads(json.dumps(keys)) == keys, engine
        assert set(SCHEDULE_KEYS) <= set(keys), f"{engine}: a schedule key is left to a default"
        assert isinstance(keys["index_skip_topk_offset"], int), engine
        hf = IndexCacheSchedule.from_hf_config(
            {
                "num_hidden_layers": schedule.num_layers,
                "num_nextn_predict_layers": schedule.num_mtp_layers,
                **keys,
            }
        )
        assert hf.all_types == schedule.all_types, engine  # MTP included
        assert _from_keys(schedule, keys).all_types == schedule.all_types, engine


def test_glm52_overrides_give_the_published_full_layers():
    # Independent of the schedule module: the layer set GLM-5.2 ships with.
    keys = serve_overrides(IndexCacheSchedule.from_freq_offset(78, 4, 3, 1))["sglang"]
    back = IndexCacheSchedule.from_hf_config(
        {"num_hidden_layers": 78, "num_nextn_predict_layers": 1, **keys}
    )
    assert set(back.full_layers) == GLM52_FULL
    assert keys["index_topk_freq"] == 4 and keys["index_skip_topk_offset"] == 3


def test_transformers_patch_is_the_export_form_and_engines_get_the_pattern(schedule):
    overrides = serve_overrides(schedule)
    export = {k: v for k, v in schedule.to_hf_config().items() if k in SCHEDULE_KEYS}
    assert overrides["transformers"] == export  # what checkpoint_tools writes to config.json
    for engine in ("sglang", "vllm"):
        assert overrides[engine]["index_topk_pattern"] == schedule.pattern
        assert len(overrides[engine]["index_topk_pattern"]) == schedule.num_layers


def _vllm_skip(keys: dict, layer: int) -> bool:
    """vllm/models/deepseek_v32/attention.py (public copy), transcribed: pattern, else freq/offset."""
    pattern = keys.get("index_topk_pattern")
    if pattern is None:
        offset = keys.get("index_skip_topk_offset", 2)
        return max(layer - offset + 1, 0) % keys.get("index_topk_freq", 1) != 0
    return pattern[layer] == "S" if layer < len(pattern) else False


def _thudm_sglang_skip(keys: dict, layer: int) -> bool:
    """THUDM/IndexCache indexcache.patch (SGLang b638b25b), transcribed: no offset key at all."""
    pattern = keys.get("index_topk_pattern")
    if pattern is None:
        return max(layer - 1, 0) % keys.get("index_topk_freq", 1) != 0
    return pattern[layer] == "S"


@pytest.mark.parametrize("reader", [_vllm_skip, _thudm_sglang_skip])
def test_engine_readers_see_our_trunk_schedule(schedule, reader):
    keys = serve_overrides(schedule)["vllm" if reader is _vllm_skip else "sglang"]
    served = "".join("S" if reader(keys, i) else "F" for i in range(schedule.num_layers))
    assert served == schedule.pattern


def test_without_the_pattern_the_thudm_patch_would_serve_glm52_wrong():
    # Why the engine overrides always carry the pattern: the original SGLang patch ignores the
    # offset, so the export form (pattern null) is read as offset 2.
    schedule = IndexCacheSchedule.from_freq_offset(78, 4, 3, 1)
    export = serve_overrides(schedule)["transformers"]
    served = "".join("S" if _thudm_sglang_skip(export, i) else "F" for i in range(78))
    assert served != schedule.pattern


def test_mtp_role_config_keys_cannot_express_is_refused():
    schedule = IndexCacheSchedule.from_pattern(GLM5_SEARCHED + "S", 78, 1)
    with pytest.raises(ScheduleError, match="MTP roles"):
        serve_overrides(schedule)
    keys = dict(serve_overrides(CASES["freq2-off1"]())["vllm"])
    keys["index_topk_pattern"] = "S" + keys["index_topk_pattern"][1:]
    with pytest.raises(ScheduleError, match="starts with a Shared layer"):
        check_round_trip(CASES["freq2-off1"](), keys)


def test_pure_module_imports_no_engine_or_torch():
    tree = ast.parse(Path(serve_config.__file__).read_text())
    names = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in (n.names if isinstance(n, ast.Import) else [n])
    }
    assert not {x.split(".")[0] for x in names if x} & {"torch", "transformers", "vllm", "sglang"}


# ---------------------------------------------------------------------- transformers 5.17
def _checkpoint_config(num_layers: int, num_mtp: int) -> dict:
    """A config.json as an all-Full checkpoint would carry it (its own indexer_types)."""
    return glm5_toy_hf_config(num_mtp_layers=num_mtp, num_hidden_layers=num_layers)


def test_transformers_builds_our_indexer_types_from_the_patch(schedule):
    from transformers import GlmMoeDsaConfig

    patch = serve_overrides(schedule, ("transformers",))["transformers"]
    base = _checkpoint_config(schedule.num_layers, schedule.num_mtp_layers)
    assert set(base["indexer_types"]) == {"full"}  # the patch must change something
    built = GlmMoeDsaConfig.from_dict({**base, **patch})
    assert list(built.indexer_types) == list(schedule.indexer_types)
    # Without indexer_types, transformers derives them from pattern / freq / explicit offset.
    rest = {k: v for k, v in patch.items() if k != "indexer_types"}
    derived = GlmMoeDsaConfig.from_dict({**base, "indexer_types": None, **rest})
    assert list(derived.indexer_types) == list(schedule.indexer_types)


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_overrides_applied_to_a_built_config_keep_indexer_types_current(schedule, engine):
    # SGLang / vLLM apply their overrides with config.update() after transformers built the
    # config: indexer_types must be in the override, or it keeps the checkpoint's values.
    from transformers import GlmMoeDsaConfig

    override = serve_overrides(schedule, (engine,))[engine]
    cfg = GlmMoeDsaConfig.from_dict(_checkpoint_config(schedule.num_layers, 1))
    cfg.update(override)
    assert list(cfg.indexer_types) == list(schedule.indexer_types)
    stale = GlmMoeDsaConfig.from_dict(_checkpoint_config(schedule.num_layers, 1))
    stale.update({k: v for k, v in override.items() if k != "indexer_types"})
    assert list(stale.indexer_types) != list(schedule.indexer_types)


def test_transformers_default_offset_is_what_we_document():
    from transformers import GlmMoeDsaConfig

    base = {**_checkpoint_config(10, 0), "indexer_types": None}
    built = GlmMoeDsaConfig.from_dict({**base, "index_topk_freq": 4})
    off = ENGINE_DEFAULT_OFFSET["transformers"]
    assert built.indexer_types == [
        "full" if rule_is_full(i, 4, off) else "shared" for i in range(10)
    ]


# ---------------------------------------------------------------------- CLI
def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["serve-config", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_single_engine_prints_one_json_line(capsys):
    rc, out, _ = _run(capsys, "--model", "glm5.2", "--engine", "sglang")
    assert rc == 0 and out.count("\n") == 1
    expected = IndexCacheSchedule.from_hf_config(preset_hf_config("glm5.2"))
    assert (
        json.loads(out)
        == serve_overrides(expected, ("sglang",), indexer_rope_interleave=True)["sglang"]
    )


def test_cli_all_engines_and_schedule_flags(capsys):
    rc, out, err = _run(
        capsys, "--model", "glm5.2", "--index-topk-freq", "2", "--index-skip-topk-offset", "1"
    )
    assert rc == 0
    data = json.loads(out)
    assert set(data) == set(ENGINES)
    assert data["vllm"]["index_topk_pattern"] == "FS" * 39
    assert "freq 2 / offset 1" in err


def test_cli_out_writes_one_file_per_engine_from_hf_dir(capsys, tmp_path):
    hf = tmp_path / "ckpt"
    hf.mkdir()
    (hf / "config.json").write_text(
        json.dumps(
            {
                **_checkpoint_config(8, 1),
                "index_topk_freq": 4,
                "index_skip_topk_offset": 3,
                "index_share_for_mtp_iteration": True,
                "indexer_types": None,
            }
        )
    )
    out_dir = tmp_path / "serve"
    rc, out, _ = _run(capsys, "--hf", str(hf), "--out", str(out_dir))
    assert rc == 0
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "sglang.json",
        "transformers.json",
        "vllm.json",
    ]
    for engine in ENGINES:
        keys = json.loads((out_dir / f"{engine}.json").read_text())
        assert keys["index_skip_topk_offset"] == 3 and keys["index_share_for_mtp_iteration"] is True
        assert keys["indexer_types"][:8] == ["full"] * 3 + ["shared"] * 3 + ["full", "shared"]
        assert f"{engine}.json" in out
    rc, _, _ = _run(
        capsys, "--hf", str(hf / "config.json"), "--engine", "vllm", "--out", str(tmp_path / "v")
    )
    assert rc == 0 and [p.name for p in (tmp_path / "v").iterdir()] == ["vllm.json"]


def test_cli_preset_omits_keys_it_does_not_know(capsys):
    # A preset does not say index_share_for_mtp_iteration: never override the checkpoint's value.
    rc, out, _ = _run(capsys, "--model", "glm5.2", "--engine", "vllm")
    assert rc == 0 and "index_share_for_mtp_iteration" not in json.loads(out)
    rc, out, _ = _run(capsys, "--model", "deepseek-v3.2", "--engine", "vllm")
    assert rc == 0 and json.loads(out)["indexer_rope_interleave"] is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "glm9"], "'glm9' is not a preset"),
        (["--model", "glm5", "--pattern", "S" + "F" * 77], "starts with a Shared layer"),
        (["--model", "glm5", "--pattern", "FFS"], "has 3 entries but the model has 78 layers"),
        (["--model", "glm5", "--index-topk-freq", "0"], "--index-topk-freq 0 is invalid"),
        (
            ["--model", "glm5", "--index-topk-freq", "4"],
            "needs an explicit --index-skip-topk-offset",
        ),
        (["--model", "glm5", "--index-skip-topk-offset", "3"], "needs --index-topk-freq"),
        (["--model", "glm5", "--pattern", GLM5_SEARCHED + "S"], "MTP roles"),
        (["--hf", "NOHF"], "does not exist"),
        (["--hf", "NOLAYERS"], "has no num_hidden_layers"),
        (
            ["--hf", "GLM52", "--index-topk-freq", "2", "--index-skip-topk-offset", "1"],
            "no indexer",
        ),
    ],
)
def test_cli_bad_input_exits_2_before_writing(capsys, tmp_path, argv, message):
    no_layers = tmp_path / "nolayers"
    no_layers.mkdir()
    (no_layers / "config.json").write_text(json.dumps({"model_type": "glm_moe_dsa"}))
    glm52 = tmp_path / "glm52"
    glm52.mkdir()
    (glm52 / "config.json").write_text(json.dumps(preset_hf_config("glm5.2")))
    paths = {"NOHF": tmp_path / "missing", "NOLAYERS": no_layers, "GLM52": glm52}
    argv = [str(paths.get(a, a)) for a in argv]
    out_dir = tmp_path / "out"
    rc, out, err = _run(capsys, *argv, "--out", str(out_dir))
    assert rc == 2
    assert message in err and err.startswith("error: ")
    assert out == "" and not out_dir.exists()


def test_cli_notes_where_engines_disagree(capsys):
    rc, _, err = _run(
        capsys,
        "--model",
        "deepseek-v3.2",
        "--index-topk-freq",
        "4",
        "--index-skip-topk-offset",
        "3",
    )
    assert rc == 0
    assert "MTP layer(s) [61] are Shared" in err  # 61: max(61 - 2, 0) % 4 = 3
    assert "deepseek_v32 in transformers 5.17 ignores these keys" in err
    rc, _, err = _run(capsys, "--model", "glm5.2")
    assert rc == 0 and "note:" not in err
