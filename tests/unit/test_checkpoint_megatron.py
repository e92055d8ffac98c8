"""Megatron side of the checkpoint tools (issue #5): ``import``, ``export``, ``verify`` on CPU toys.

Toys: ``tests/helpers/hf_toys`` checkpoints (bf16, fp32 ``weights_proj`` / router bias, an MTP
layer in its own shard), saved for GLM-5 (all Full), GLM-5.2 (freq 4 / offset 3), a custom
F/S pattern, DeepSeek-V3.2 (all Full) and block-FP8.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_tools.__main__ import main as cli
from checkpoint_tools.dcp_reader import sharded_location
from checkpoint_tools.errors import (
    CheckpointError,
    ConfigError,
    ConfigScheduleMismatchError,
    CorruptShardError,
    DtypeMismatchError,
    Fp8ScaleMissingError,
    MissingTensorError,
    OutputExistsError,
    ParallelLayoutError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnsupportedConversionError,
)
from checkpoint_tools.export_megatron import export_checkpoint
from checkpoint_tools.fp8 import read_dequantized, read_dequantized_slice
from checkpoint_tools.hf_io import HFCheckpoint
from checkpoint_tools.import_megatron import ImportResult, plan_import, run_import
from checkpoint_tools.megatron_dir import MODEL_CONFIG_NAME, read_model_config
from checkpoint_tools.megatron_runtime import ParallelLayout, build_stage
from checkpoint_tools.schedule_plan import ScheduleRequest
from checkpoint_tools.verify import verify
from indexcache_train.model.config import ModelConfig
from indexcache_train.model.hf_mapping import export_hf_state_dict, hf_tensor_names
from indexcache_train.model.toy_configs import glm5_toy_hf_config
from tests.helpers.hf_toys import (
    make_dsv32_toy_config,
    make_fp8_checkpoint,
    make_glm5_toy_config,
    read_all,
    save_toy_checkpoint,
)
from tests.helpers.megatron_env import init_single_process

FP8_BLOCK = (16, 16)  # several blocks (and partial edge blocks) per toy weight


@pytest.fixture(scope="module", autouse=True)
def _megatron() -> None:
    init_single_process()


@pytest.fixture(scope="module")
def toys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toys")
    pattern = ["full", "shared", "shared", "full"]  # not periodic once the (Full) MTP layer counts
    out = {
        "glm5": save_toy_checkpoint(make_glm5_toy_config(), root / "glm5"),
        "glm52": save_toy_checkpoint(
            make_glm5_toy_config(index_topk_freq=4, index_skip_topk_offset=3), root / "glm52"
        ),
        "pattern": save_toy_checkpoint(
            make_glm5_toy_config(indexer_types=pattern), root / "pattern"
        ),
        # 8 routed per token over 8 groups of 2, top-4 groups: Megatron's grouped routing needs
        # num_experts_per_tok // topk_group == 2 to match HF.
        "dsv32": save_toy_checkpoint(make_dsv32_toy_config(num_experts_per_tok=8), root / "dsv32"),
    }
    out["fp8"] = make_fp8_checkpoint(out["glm5"], root / "fp8", block=FP8_BLOCK)
    return out


def _import(hf: Path, out: Path, request: ScheduleRequest | None = None, **kw) -> ImportResult:
    layout = kw.pop("layout", None)
    overwrite = kw.pop("overwrite", False)
    plan = plan_import(HFCheckpoint(hf), request, **kw)
    return run_import(plan, out, layout, overwrite=overwrite)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _load_tp1(megatron_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The checkpoint loaded with dist_checkpointing into a TP=1 model, under HF names."""
    from megatron.core import dist_checkpointing

    _, cfg = read_model_config(megatron_dir)
    model = build_stage(cfg, ParallelLayout(), torch.bfloat16)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(megatron_dir)))
    return cfg, export_hf_state_dict(model, cfg)


# ---------------------------------------------------------------------- layout facts
@pytest.mark.parametrize(
    "hf_config",
    [
        glm5_toy_hf_config(num_hidden_layers=4, index_topk_freq=4, index_skip_topk_offset=3),
        glm5_toy_hf_config(num_hidden_layers=3, first_k_dense_replace=2),
    ],
    ids=["freq4-shared-mtp", "dense-mtp-full"],
)
def test_sharded_keys_are_what_megatron_saves(hf_config: dict) -> None:
    """export derives keys from names; check the rule against the model's own sharded_state_dict."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    cfg = ModelConfig.from_hf_config(hf_config)
    model = build_stage(cfg, ParallelLayout(), torch.float32)
    seen = 0
    for name, entry in model.sharded_state_dict().items():
        if isinstance(entry, ShardedTensorFactory):
            built = entry.build()
            entry = built[0] if isinstance(built, list) else next(iter(built.values()))
        if not isinstance(entry, ShardedTensor):
            continue
        loc = sharded_location(name)
        assert loc.key == entry.key, name
        assert loc.index == entry.global_offset[: entry.prepend_axis_num], name
        seen += 1
    assert seen == len(list(model.state_dict(keep_vars=True))) - sum(
        1 for n in model.state_dict() if n.endswith("_extra_state")
    )
    assert any(".experts.experts." in sharded_location(n).key for n in model.state_dict())
    assert any(".transformer_layer." in sharded_location(n).key for n in model.state_dict())


def test_slice_reads_equal_narrowed_full_reads(toys: dict[str, Path]) -> None:
    ckpt, fp8 = HFCheckpoint(toys["glm5"]), HFCheckpoint(toys["fp8"])
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight"):
        full = ckpt.read_tensor(name)
        for dim in range(full.dim()):
            n = full.shape[dim]
            for start, stop in ((0, n // 2), (n // 2, n), (3, n - 5)):
                got = ckpt.read_slice(name, dim, start, stop)
                assert torch.equal(_bits(got), _bits(full.narrow(dim, start, stop - start)))
    # FP8: block-aligned reads, cropped; unaligned ranges cross partial blocks.
    name = "model.layers.1.self_attn.q_b_proj.weight"
    assert fp8.info(name).dtype == "F8_E4M3"
    full = read_dequantized(fp8, name)
    for dim, (start, stop) in ((0, (5, 27)), (1, (0, 16)), (1, (7, 32)), (0, (16, 32))):
        got = read_dequantized_slice(fp8, name, dim, start, stop)
        assert torch.equal(_bits(got), _bits(full.narrow(dim, start, stop - start)))


def test_parallel_layout_world_size_rule() -> None:
    cfg = ModelConfig.from_hf_config(glm5_toy_hf_config())  # 16 experts, 4 heads
    layout = ParallelLayout.for_import
    # Expert TP fills what EP leaves of TP, so no two ranks of a stage hold the same expert piece.
    assert [layout(2).etp, layout(8, ep=2).etp, layout(8, ep=8).etp, layout(2, ep=4).etp] == [
        2,
        4,
        1,
        1,
    ]
    assert layout(8, ep=8).min_world_size() == 8 and layout(8, ep=2).min_world_size() == 8
    assert layout(2, pp=4, ep=8).min_world_size() == 32  # PP x lcm(TP, EP)
    layout(2, ep=2).check(2, cfg)
    layout(1, ep=2).check(2, cfg)
    layout(2, ep=4).check(4, cfg)
    with pytest.raises(ParallelLayoutError, match="--nproc-per-node 4"):
        layout(2, pp=2).check(2, cfg)
    with pytest.raises(ParallelLayoutError, match="EP must divide"):
        layout(2, ep=4).check(2, cfg)
    with pytest.raises(ParallelLayoutError, match="num_attention_heads=4"):
        layout(8).check(8, cfg)


# ---------------------------------------------------------------------- L1 + L2
@pytest.mark.parametrize("toy", ["glm5", "glm52", "pattern", "dsv32"])
def test_verify_round_trip_exact_and_parity(toys: dict[str, Path], toy: str) -> None:
    result = verify(toys[toy])
    source = HFCheckpoint(toys[toy])
    assert result.l1.passed, result.l1.table()
    assert result.l1.compared == len(source.names)  # every source tensor made the trip
    assert result.l2 is not None and result.l2.passed, result.l2.table()
    assert result.l2.logits_max_abs <= 1e-5 and not result.l2.loading_issues
    assert result.l2.argmax_equal == result.l2.batch * result.l2.seq_len
    assert [r.layer for r in result.l2.rows] == [0, 1, 2, 3]
    assert all(r.topk_equal == r.topk_rows > 0 for r in result.l2.rows)
    shared = [r.role for r in result.l2.rows if r.role.startswith("S")]
    assert shared == {"glm5": [], "dsv32": [], "glm52": ["S<-2"], "pattern": ["S<-0", "S<-0"]}[toy]


def test_verify_first_layers_only(toys: dict[str, Path], tmp_path: Path) -> None:
    result = verify(toys["glm52"], num_layers=2, work_dir=tmp_path)
    assert result.passed, result.l1.table() + "\n" + result.l2.table()
    assert [r.layer for r in result.l2.rows] == [0, 1]
    plan = plan_import(HFCheckpoint(toys["glm52"]), num_layers=2)
    assert (plan.model.num_layers, plan.model.num_mtp_layers) == (2, 0)
    done = run_import(plan, tmp_path / "two")
    assert (
        done.metadata["hf_tensors_read"] == len(hf_tensor_names(plan.model)) == result.l1.compared
    )
    assert list(tmp_path.iterdir()) == [tmp_path / "two"]  # verify cleaned up its work dir


def test_fp8_is_dequantised_like_the_reference(toys: dict[str, Path], tmp_path: Path) -> None:
    result = verify(toys["fp8"])
    assert result.passed and result.l1.fp8_dequantized > 100, result.l1.table()
    _import(toys["fp8"], tmp_path / "mc")
    _, loaded = _load_tp1(tmp_path / "mc")
    raw = read_all(toys["fp8"])
    quantised = [n for n, t in raw.items() if t.dtype == torch.float8_e4m3fn]
    assert len(quantised) == result.l1.fp8_dequantized
    for name in quantised:
        q, scale = raw[name].float(), raw[name + "_scale_inv"]
        blocks = scale.repeat_interleave(FP8_BLOCK[0], 0).repeat_interleave(FP8_BLOCK[1], 1)
        want = (q * blocks[: q.shape[0], : q.shape[1]]).to(torch.bfloat16)
        assert torch.equal(loaded[name], want), name
    assert not any(n.endswith("_scale_inv") for n in loaded)
    assert json.loads((tmp_path / "mc" / "import_metadata.json").read_text())["fp8_dequantized"]


# ---------------------------------------------------------------------- import / export details
def test_import_writes_loadable_checkpoint_and_model_config(
    toys: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "mc"
    _import(toys["glm52"], out)
    names = {p.name for p in out.iterdir()}
    assert {MODEL_CONFIG_NAME, "import_metadata.json", "metadata.json", ".metadata"} <= names
    hf_config, cfg = read_model_config(out)
    assert cfg.schedule.pattern == "FFFS" and cfg.schedule.mtp_indexer_types == ("shared",)
    assert (hf_config["index_topk_freq"], hf_config["index_skip_topk_offset"]) == (4, 3)
    assert cfg == ModelConfig.from_hf_config(HFCheckpoint(toys["glm52"]).config)
    _, loaded = _load_tp1(out)
    source = read_all(toys["glm52"])
    assert loaded.keys() == source.keys()
    for name, tensor in source.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(
            _bits(loaded[name]), _bits(tensor)
        )


def test_exported_glm_loads_in_transformers(toys: dict[str, Path], tmp_path: Path) -> None:
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    _import(toys["glm52"], tmp_path / "mc")
    out = tmp_path / "hf"
    export_checkpoint(
        tmp_path / "mc", out, hf_ref=toys["glm52"], shard_size="200KB", batch_size="64KB"
    )
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors.index.json" in files and "tokenizer_config.json" in files
    assert len([f for f in files if f.endswith(".safetensors")]) > 2
    tensors = read_all(out)
    assert not [n for n in tensors if n.startswith("model.layers.3.self_attn.indexer")]
    assert not [n for n in tensors if n.startswith("model.layers.4.self_attn.indexer")]  # MTP: S
    assert "model.layers.2.mlp.experts.7.up_proj.weight" in tensors
    assert {n for n, t in tensors.items() if t.dtype == torch.float32} == {
        n for n in tensors if n.endswith(("weights_proj.weight", "e_score_correction_bias"))
    }
    for key in ("model.layers.4.enorm.weight", "model.layers.4.shared_head.norm.weight"):
        assert key in tensors
    config = json.loads((out / "config.json").read_text())
    assert config["indexer_types"] == ["full", "full", "full", "shared"]
    assert (config["index_topk_freq"], config["index_skip_topk_offset"]) == (4, 3)
    assert config["index_topk_pattern"] is None and config["dtype"] == "bfloat16"
    assert GlmMoeDsaConfig.from_pretrained(out).indexer_types == config["indexer_types"]
    model, info = GlmMoeDsaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    unexpected = list(info["unexpected_keys"])
    assert unexpected and all(k.startswith("model.layers.4.") for k in unexpected)
    assert model.model.layers[3].self_attn.indexer is None


def test_export_dtype_keeps_fp32_tensors(toys: dict[str, Path], tmp_path: Path) -> None:
    _import(toys["dsv32"], tmp_path / "mc")
    export_checkpoint(tmp_path / "mc", tmp_path / "hf", dtype="float16")
    dtypes = {n: t.dtype for n, t in read_all(tmp_path / "hf").items()}
    fp32 = {n for n, d in dtypes.items() if d == torch.float32}
    assert fp32 and all(
        n.endswith(("weights_proj.weight", "e_score_correction_bias")) for n in fp32
    )
    assert {d for n, d in dtypes.items() if n not in fp32} == {torch.float16}


def test_import_pattern_drops_shared_indexers_only_when_asked(
    toys: dict[str, Path], tmp_path: Path
) -> None:
    request = ScheduleRequest(pattern="FSFF")
    with pytest.raises(UnexpectedTensorError, match=r"model\.layers\.1\.self_attn\.indexer"):
        _import(toys["glm5"], tmp_path / "refused", request)
    assert not (tmp_path / "refused").exists()
    done = _import(toys["glm5"], tmp_path / "mc", request, drop_shared_indexers=True)
    assert len(done.metadata["dropped_shared_layer_indexers"]) == 5
    export_checkpoint(tmp_path / "mc", tmp_path / "hf")
    source, exported = read_all(toys["glm5"]), read_all(tmp_path / "hf")
    assert set(source) - set(exported) == set(done.metadata["dropped_shared_layer_indexers"])
    assert all(torch.equal(_bits(exported[n]), _bits(source[n])) for n in exported)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["index_topk_pattern"] == "FSFF" and config["indexer_types"][1] == "shared"


def test_overwrite_replaces_the_previous_checkpoint(toys: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "mc"
    _import(toys["glm5"], out)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        _import(toys["glm52"], out)
    _import(toys["glm52"], out, overwrite=True)
    assert read_model_config(out)[1].schedule.pattern == "FFFS"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mc"]


# ---------------------------------------------------------------------- bad input
def _rewrite(ckpt_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Apply ``edit`` to every shard's tensors and keep the index consistent."""
    index_path = ckpt_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = {}
    for shard in sorted(ckpt_dir.glob("*.safetensors")):
        tensors = load_file(shard)
        edit(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index))


def _edit_config(ckpt_dir: Path, **changes: object) -> None:
    path = ckpt_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _drop(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors.pop(name, None)

    return edit


def _to_fp16(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        if name in tensors:
            tensors[name] = tensors[name].half()

    return edit


def _truncate(ckpt_dir: Path) -> None:
    shard = sorted(ckpt_dir.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])


BAD_INPUTS: dict[str, tuple[str, Callable[[Path], None], dict, type[CheckpointError], str]] = {
    "missing-tensor": (
        "glm5",
        lambda d: _rewrite(d, _drop("model.layers.1.self_attn.kv_b_proj.weight")),
        {},
        MissingTensorError,
        "model.layers.1.self_attn.kv_b_proj.weight",
    ),
    "indexer-on-shared-layer": (
        "glm5",
        lambda d: None,
        {"request": ScheduleRequest(4, 3)},
        UnexpectedTensorError,
        "--drop-shared-indexers",
    ),
    "fp8-without-scale": (
        "fp8",
        lambda d: _rewrite(d, _drop("model.layers.2.self_attn.o_proj.weight_scale_inv")),
        {},
        Fp8ScaleMissingError,
        "model.layers.2.self_attn.o_proj.weight",
    ),
    "shape-vs-config": (
        "glm5",
        lambda d: _edit_config(d, q_lora_rank=24),
        {},
        ShapeMismatchError,
        "q_a_proj.weight",
    ),
    "dtype-vs-config": (
        "glm5",
        lambda d: _rewrite(d, _to_fp16("model.norm.weight")),
        {},
        DtypeMismatchError,
        "model.norm.weight",
    ),
    "schedule-keys-disagree": (
        "glm5",
        lambda d: _edit_config(d, index_topk_freq=2, index_skip_topk_offset=1),
        {},
        ConfigScheduleMismatchError,
        "config.json",
    ),
    "request-does-not-fit": (
        "glm5",
        lambda d: None,
        {"request": ScheduleRequest(pattern="FSF")},
        ConfigScheduleMismatchError,
        "4 layers",
    ),
    "truncated-shard": (
        "glm5",
        _truncate,
        {},
        CorruptShardError,
        "truncated",
    ),
    "dense-parent": (
        "glm5",
        lambda d: _edit_config(d, model_type="deepseek_v3"),
        {},
        ConfigError,
        "convert-schedule",
    ),
    "world-size": (
        "glm5",
        lambda d: None,
        {"layout": ParallelLayout.for_import(tp=2)},
        ParallelLayoutError,
        "world size 1",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_before_writing(
    case: str, toys: dict[str, Path], tmp_path: Path
) -> None:
    toy, corrupt, kwargs, error, needle = BAD_INPUTS[case]
    src = shutil.copytree(toys[toy], tmp_path / "src")
    corrupt(src)
    out = tmp_path / "out"
    with pytest.raises(error) as info:
        _import(src, out, **kwargs)
    message = str(info.value)
    assert needle in message and "Fix:" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temp dir


def test_export_refuses_bad_megatron_dirs(toys: dict[str, Path], tmp_path: Path) -> None:
    _import(toys["glm5"], tmp_path / "mc")
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        export_checkpoint(tmp_path / "mc", tmp_path / "exists")
    bare = shutil.copytree(tmp_path / "mc", tmp_path / "bare")
    (bare / MODEL_CONFIG_NAME).unlink()
    with pytest.raises(ConfigError, match=MODEL_CONFIG_NAME):
        export_checkpoint(bare, tmp_path / "hf")
    # A model_config.yaml of another schedule: the stored tensors do not fit it.
    other = shutil.copytree(tmp_path / "mc", tmp_path / "other")
    text = (other / MODEL_CONFIG_NAME).read_text().replace("num_mtp_layers: 1", "num_mtp_layers: 0")
    (other / MODEL_CONFIG_NAME).write_text(
        text.replace("num_nextn_predict_layers: 1", "num_nextn_predict_layers: 0")
    )
    with pytest.raises(UnexpectedTensorError, match=r"mtp\.layers\.0"):
        export_checkpoint(other, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "exists", "mc", "other"]
    assert list((tmp_path / "exists").iterdir()) == []


def test_deepseek_with_shared_layers_exports_only_when_allowed(
    toys: dict[str, Path], tmp_path: Path
) -> None:
    """Our trainer runs IndexCache on DeepSeek-V3.2; transformers 5.17 cannot build it (L2 skips)."""
    request = ScheduleRequest(4, 3)
    _import(toys["dsv32"], tmp_path / "mc", request, drop_shared_indexers=True)
    with pytest.raises(UnsupportedConversionError, match="--allow-transformers-incompatible"):
        export_checkpoint(tmp_path / "mc", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    export_checkpoint(tmp_path / "mc", tmp_path / "hf", allow_transformers_incompatible=True)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v32" and config["index_topk_freq"] == 4
    assert not [
        n for n in read_all(tmp_path / "hf") if n.startswith("model.layers.3.self_attn.indexer")
    ]


def test_cli_reports_errors_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    rc = cli(["export", "--ckpt", str(tmp_path / "empty"), "--out", str(tmp_path / "hf")])
    assert rc == 2
    assert MODEL_CONFIG_NAME in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------- outputs (issue #22)
def test_outputs_get_umask_permissions_not_0700(toys: dict[str, Path], tmp_path: Path) -> None:
    """import / export / convert-schedule outputs are served by other users: mkdir's mode."""
    from checkpoint_tools.convert_schedule import convert_schedule

    old = os.umask(0o022)
    try:
        _import(toys["glm5"], tmp_path / "mc")
        export_checkpoint(tmp_path / "mc", tmp_path / "hf")
        convert_schedule(toys["glm5"], tmp_path / "conv", ScheduleRequest(4, 3))
        for out in ("mc", "hf", "conv"):
            assert stat.S_IMODE((tmp_path / out).stat().st_mode) == 0o755, out
        os.umask(0o077)
        export_checkpoint(tmp_path / "mc", tmp_path / "private")
        assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o700
    finally:
        os.umask(old)


def test_export_defaults_to_the_checkpoint_dtype(
    toys: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _import(toys["glm5"], tmp_path / "mc", dtype="float32")
    rc = cli(["export", "--ckpt", str(tmp_path / "mc"), "--out", str(tmp_path / "hf")])
    assert rc == 0
    assert "float32 = the checkpoint's own dtype" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float32"
    assert {t.dtype for t in read_all(tmp_path / "hf").values()} == {torch.float32}
    result = export_checkpoint(tmp_path / "mc", tmp_path / "hf16", dtype="float16")
    assert (result.dtype, result.dtype_reason) == ("float16", "--dtype")


def test_export_copies_the_recorded_tokenizer_or_warns(
    toys: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _import(toys["glm5"], tmp_path / "mc")
    result = export_checkpoint(tmp_path / "mc", tmp_path / "hf")
    assert "tokenizer_config.json" in result.side_files and not result.warnings
    assert (tmp_path / "hf" / "tokenizer_config.json").read_text() == (
        toys["glm5"] / "tokenizer_config.json"
    ).read_text()
    meta = tmp_path / "mc" / "import_metadata.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "source": str(tmp_path / "gone")}))
    rc = cli(["export", "--ckpt", str(tmp_path / "mc"), "--out", str(tmp_path / "bare")])
    err = capsys.readouterr().err
    assert rc == 0 and "warning: no tokenizer in the export" in err and "--hf-ref" in err
    assert not (tmp_path / "bare" / "tokenizer_config.json").exists()


def test_export_follows_a_runs_latest_checkpoint(
    toys: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _import(toys["glm5"], tmp_path / "mc")
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        shutil.copytree(tmp_path / "mc", ckpts / f"step_{step:08d}")
        (ckpts / f"step_{step:08d}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    (ckpts / "latest").write_text("step_00000002")
    for i, where in enumerate((ckpts, ckpts.parent)):
        rc = cli(["export", "--ckpt", str(where), "--out", str(tmp_path / f"hf{i}")])
        out = capsys.readouterr().out
        assert rc == 0 and f"following {ckpts / 'latest'}: {ckpts / 'step_00000002'}" in out
        assert read_all(tmp_path / f"hf{i}").keys() == read_all(toys["glm5"]).keys()
    empty = tmp_path / "empty_run" / "checkpoints"
    (empty / "step_00000003.tmp").mkdir(parents=True)
    (empty / "latest").write_text("step_00000003")
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        export_checkpoint(empty.parent, tmp_path / "none")
    assert not (tmp_path / "none").exists()
