"""Streaming HF checkpoint I/O: header parsing, single-tensor reads, the sharded writer."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from checkpoint_tools.errors import (
    CorruptShardError,
    DtypeMismatchError,
    MissingTensorError,
    OutputExistsError,
    ShapeMismatchError,
)
from checkpoint_tools.hf_io import (
    INDEX_NAME,
    SINGLE_FILE_NAME,
    HFCheckpoint,
    ShardedCheckpointWriter,
    copy_side_files,
    parse_size,
    plan_shards,
)
from checkpoint_tools.progress import LineProgress, NullProgress, make_progress
from checkpoint_tools.safetensors_format import TensorSpec, dtype_string
from tests.helpers.hf_toys import make_glm5_toy_config, save_toy_checkpoint


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GLM-5 toy with an MTP layer: two shards plus an index, as save_pretrained + MTP gives."""
    return save_toy_checkpoint(make_glm5_toy_config(), tmp_path_factory.mktemp("io") / "glm5")


def _mixed_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(33, 17, generator=gen).to(torch.bfloat16),
        "b.f32": torch.randn(100, generator=gen),
        "c.fp8": torch.randn(40, 24, generator=gen).to(torch.float8_e4m3fn),
        "d.i64": torch.arange(7, dtype=torch.int64),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.empty(0, 4),
        "h.f16": torch.randn(5, 5, 5, generator=gen).half(),
    }


def _specs(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(k, dtype_string(v.dtype), tuple(v.shape)) for k, v in tensors.items()]


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size(1234) == 1234
    for bad in ("5XB", "", "-1GB", "GB", 0):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_reader_lists_headers_like_safetensors(toy: Path) -> None:
    ckpt = HFCheckpoint(toy)
    index = json.loads((toy / INDEX_NAME).read_text())["weight_map"]
    assert sorted(ckpt.names) == sorted(index)
    for info in ckpt.infos():
        assert info.file == index[info.name]
        with safe_open(info.path, framework="pt") as f:
            sl = f.get_slice(info.name)
            assert list(info.shape) == sl.get_shape()
            assert info.dtype == sl.get_dtype()
    assert ckpt.total_size == sum(t.numel() * t.element_size() for t in _load_dir(toy).values())
    assert "model.layers.4.eh_proj.weight" in ckpt and len(ckpt.shard_files) == 2


def test_read_tensor_matches_safe_open_bitwise(toy: Path) -> None:
    ckpt = HFCheckpoint(toy)
    reference = _load_dir(toy)
    for name in ckpt.names:
        assert _bitwise_equal(ckpt.read_tensor(name), reference[name]), name
    with pytest.raises(MissingTensorError, match=re.escape("model.layers.9")):
        ckpt.read_tensor("model.layers.9.nothing")


def test_writer_round_trip_with_shards(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    out = tmp_path / "ckpt"
    max_bytes = 2000
    with ShardedCheckpointWriter(out, _specs(tensors), max_shard_size=max_bytes) as writer:
        writer.write_json("config.json", {"model_type": "toy"})
        for name in reversed(list(tensors)):  # any order: offsets were planned up front
            writer.write_tensor(name, tensors[name])
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(
        v.numel() * v.element_size() for v in tensors.values()
    )
    assert list(index["weight_map"]) == sorted(tensors)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (out / SINGLE_FILE_NAME).exists()
    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = load_file(shard)  # the reference reader accepts our files
        payload = sum(v.numel() * v.element_size() for v in part.values())
        assert payload <= max_bytes or len(part) == 1
        assert all(index["weight_map"][k] == shard.name for k in part)
        loaded.update(part)
    assert loaded.keys() == tensors.keys()
    assert all(_bitwise_equal(loaded[k], tensors[k]) for k in tensors)
    back = HFCheckpoint(out)
    assert all(_bitwise_equal(back.read_tensor(k), tensors[k]) for k in tensors)
    assert _leftovers(tmp_path) == []


def test_writer_single_shard_has_no_index(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    with ShardedCheckpointWriter(tmp_path / "one", _specs(tensors)) as writer:
        writer.write_json("config.json", {})
        for name, tensor in tensors.items():
            writer.write_tensor(name, tensor)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json", SINGLE_FILE_NAME]
    with safe_open(tmp_path / "one" / SINGLE_FILE_NAME, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers checks this key


def test_plan_shards_greedy_like_save_pretrained() -> None:
    specs = [TensorSpec(str(i), "U8", (n,)) for i, n in enumerate([4, 4, 4, 10, 1])]
    assert [[s.name for s in shard] for shard in plan_shards(specs, 8)] == [
        ["0", "1"],
        ["2"],
        ["3"],
        ["4"],
    ]


def test_writer_refuses_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        ShardedCheckpointWriter(out, [])
    assert (out / "keep.txt").read_text() == "old"


def test_overwrite_replaces_only_after_success(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    tensors = _mixed_tensors()
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedCheckpointWriter(out, _specs(tensors), overwrite=True) as writer:
            writer.write_tensor("a.bf16", tensors["a.bf16"])
            raise RuntimeError("boom")
    assert (out / "keep.txt").read_text() == "old"  # untouched by the failed write
    with ShardedCheckpointWriter(out, _specs(tensors), overwrite=True) as writer:
        for name, tensor in tensors.items():
            writer.write_tensor(name, tensor)
    assert not (out / "keep.txt").exists() and (out / SINGLE_FILE_NAME).exists()
    assert _leftovers(tmp_path) == []


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    out = tmp_path / "never"
    with pytest.raises(MissingTensorError, match="never written"):
        with ShardedCheckpointWriter(out, _specs(tensors)) as writer:
            writer.write_tensor("a.bf16", tensors["a.bf16"])
    assert not out.exists() and _leftovers(tmp_path) == []
    with pytest.raises(DtypeMismatchError, match=r"a\.bf16"):
        with ShardedCheckpointWriter(out, _specs(tensors)) as writer:
            writer.write_tensor("a.bf16", tensors["a.bf16"].float())
    with pytest.raises(ShapeMismatchError, match=r"b\.f32"):
        with ShardedCheckpointWriter(out, _specs(tensors)) as writer:
            writer.write_tensor("b.f32", tensors["b.f32"][:10])
    with pytest.raises(ValueError, match="written twice"):
        with ShardedCheckpointWriter(out, _specs(tensors)) as writer:
            writer.write_tensor("b.f32", tensors["b.f32"])
            writer.write_tensor("b.f32", tensors["b.f32"])
    assert not out.exists() and _leftovers(tmp_path) == []


def test_copy_tensor_is_bit_identical(toy: Path, tmp_path: Path) -> None:
    src = HFCheckpoint(toy)
    names = src.names
    specs = [TensorSpec(n, src.info(n).dtype, src.info(n).shape) for n in names]
    with ShardedCheckpointWriter(tmp_path / "copy", specs, max_shard_size="20KB") as writer:
        for name in names:
            writer.copy_tensor(name, src.info(name))
    copied = _load_dir(tmp_path / "copy")
    reference = _load_dir(toy)
    assert all(_bitwise_equal(copied[k], reference[k]) for k in reference)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "huge_header_len", "bad_span"])
def test_corrupt_shard_detected_on_open(toy: Path, tmp_path: Path, damage: str) -> None:
    bad = _copy_dir(toy, tmp_path / "bad")
    shard = bad / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "garbage_header":
        data[8:20] = b"not json at!"
    elif damage == "huge_header_len":
        data[:8] = struct.pack("<Q", len(data) * 2)
    else:  # the first tensor's begin offset 0 -> 2: its span no longer fits dtype x shape
        header = data[8 : 8 + header_len].decode()
        assert '"data_offsets":[0,' in header
        data[8 : 8 + header_len] = header.replace(
            '"data_offsets":[0,', '"data_offsets":[2,', 1
        ).encode()
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=re.escape("model-00001-of-00002.safetensors")):
        HFCheckpoint(bad)


@pytest.mark.parametrize(
    ("second", "data_len", "message"),
    [
        ((6, 10), 10, "tensor `b`: its data_offsets leave a hole"),
        ((2, 6), 6, "tensor `b`: its data_offsets leave a hole, overlap"),
        ((4, 8), 12, r"file is \d+ bytes but its header describes \d+ \(trailing bytes\)"),
        ((4, 8), 6, "truncated: incomplete download"),
    ],
)
def test_offsets_must_tile_the_file(
    tmp_path: Path, second: tuple[int, int], data_len: int, message: str
) -> None:
    header = {
        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
        "b": {"dtype": "U8", "shape": [4], "data_offsets": list(second)},
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_len))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CorruptShardError, match=message):
        HFCheckpoint(tmp_path)


def test_index_inconsistencies_detected(toy: Path, tmp_path: Path) -> None:
    bad = _copy_dir(toy, tmp_path / "missing_shard")
    (bad / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CorruptShardError, match="does not exist"):
        HFCheckpoint(bad)
    bad = _copy_dir(toy, tmp_path / "ghost")
    index = json.loads((bad / INDEX_NAME).read_text())
    index["weight_map"]["model.ghost.weight"] = "model-00001-of-00002.safetensors"
    (bad / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CorruptShardError, match=re.escape("model.ghost.weight")):
        HFCheckpoint(bad)
    bad = _copy_dir(toy, tmp_path / "unindexed")
    index = json.loads((bad / INDEX_NAME).read_text())
    del index["weight_map"]["model.norm.weight"]
    (bad / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CorruptShardError, match=re.escape("model.norm.weight")):
        HFCheckpoint(bad)


def test_copy_side_files(toy: Path, tmp_path: Path) -> None:
    (toy / ".hidden").write_text("x")
    with ShardedCheckpointWriter(tmp_path / "side", []) as writer:
        copied = copy_side_files(toy, writer, skip=("config.json",))
    assert copied == ["generation_config.json", "tokenizer_config.json"]
    assert (tmp_path / "side" / "tokenizer_config.json").read_text() == (
        toy / "tokenizer_config.json"
    ).read_text()
    (toy / ".hidden").unlink()


def test_progress_fallback_and_null(capsys: pytest.CaptureFixture[str]) -> None:
    assert isinstance(make_progress(10, "x", enabled=False), NullProgress)
    bar = LineProgress(2_000_000_000, "converting", interval_s=0.0)
    bar.update(1_000_000_000)
    bar.close()
    assert "converting: 1.00/2.00 GB (50%)" in capsys.readouterr().err


def _load_dir(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _copy_dir(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst
