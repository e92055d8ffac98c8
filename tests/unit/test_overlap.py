"""The ``overlap`` tool: planted top-k overlaps, mass vs brute force, CSV, CLI end to end."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from indexcache_train.tools.overlap import OverlapStats, mass_sums, matrix_csv, overlap_sums
from tests.helpers.images import read_png

pytestmark = pytest.mark.unit

# Planted sets, k = 2, one batch row, 4 query rows; -1 = empty slot.
#   row 0: T0 {0,1}  T1 {1,0}  T2 {0,2}
#   row 1: T0 {2,3}  T1 {3,5}  T2 {6,7}
#   row 2: T0 {4,-}  T1 {4,5}  T2 {5,4}    T0 has fewer than k keys: pairs with layer 0 skip it
#   row 3: T0 {1,2}  T1 {-,-}  T2 {2,9}    T1 empty: pairs with layer 1 skip it
PLANTED = torch.tensor(
    [
        [[[0, 1], [2, 3], [4, -1], [1, 2]]],
        [[[1, 0], [3, 5], [4, 5], [-1, -1]]],
        [[[0, 2], [6, 7], [5, 4], [2, 9]]],
    ],
    dtype=torch.int32,
)
# By hand: O01 rows 0,1: (2/2 + 1/2) / 2; O02 rows 0,1,3: (1/2 + 0 + 1/2) / 3;
# O12 rows 0,1,2: (1/2 + 0 + 2/2) / 3; diagonals 1 over 3, 3 and 4 rows.
EXPECTED = [[1.0, 0.75, 1 / 3], [0.75, 1.0, 0.5], [1 / 3, 0.5, 1.0]]
EXPECTED_ROWS = [[3, 2, 3], [2, 3, 3], [3, 3, 4]]


@pytest.mark.parametrize("chunk", [1, 3, 128])
def test_planted_overlaps_match_hand_computation(chunk: int) -> None:
    sums, rows = overlap_sums(PLANTED, chunk=chunk)
    assert rows.tolist() == EXPECTED_ROWS
    assert torch.allclose(sums / rows, torch.tensor(EXPECTED, dtype=torch.float64))


def test_row_mask_and_batch_accumulation_are_row_weighted() -> None:
    keep = torch.tensor([[False, True, True, True]])
    sums, rows = overlap_sums(PLANTED, keep)
    assert rows[0, 1] == 1 and sums[0, 1] == 0.5  # only row 1 is left for (0, 1)
    stats = OverlapStats.zeros(3)
    stats.add_overlap(PLANTED)
    stats.add_overlap(PLANTED[:, :, :1])  # row 0 again: O01 = (1 + 1/2 + 1) / 3
    assert stats.overlap()[0, 1].item() == pytest.approx(2.5 / 3)
    assert stats.overlap_rows[0, 1] == 3


def test_layer_without_valid_rows_gives_nan() -> None:
    topk = PLANTED.clone()
    topk[1] = -1
    o = OverlapStats.zeros(3)
    o.add_overlap(topk)
    assert math.isnan(o.overlap()[0, 1]) and math.isnan(o.overlap()[1, 1])
    assert o.overlap()[0, 2].item() == pytest.approx(1 / 3)


def _random_topk(gen: torch.Generator, L: int, B: int, S: int, K: int, T: int) -> torch.Tensor:
    idx = torch.stack([torch.randperm(T, generator=gen)[:K] for _ in range(L * B * S)]).view(
        L, B, S, K
    )
    drop = torch.rand(L, B, S, generator=gen) < 0.2
    idx[..., -1] = torch.where(drop, -1, idx[..., -1])  # some rows with fewer than k keys
    return idx.int()


def test_mass_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    L, B, S, K, T = 3, 2, 7, 3, 9
    topk = _random_topk(gen, L, B, S, K, T)
    probs = torch.rand(B, S, T, generator=gen, dtype=torch.float64) * 5  # head sums: not normalised
    probs[1, 2] = 0.0  # a row without a valid key
    keep = torch.rand(B, S, generator=gen) < 0.8
    layer = 1
    sums, rows = mass_sums(lambda s0, s1: probs[:, s0:s1], layer, topk, keep, chunk=3)
    want_sum, want_rows = [0.0] * L, [0] * L
    for j in range(L):
        for b in range(B):
            for s in range(S):
                own, other = topk[layer, b, s].tolist(), topk[j, b, s].tolist()
                total = probs[b, s].sum().item()
                if -1 in own or -1 in other or total == 0 or not keep[b, s]:
                    continue
                want_sum[j] += sum(probs[b, s, t].item() for t in other) / total
                want_rows[j] += 1
    assert rows.tolist() == want_rows
    assert sums.tolist() == pytest.approx(want_sum)
    # Row ``layer`` of the stats matrix, the rest untouched.
    stats = OverlapStats.zeros(L)
    stats.add_mass(lambda s0, s1: probs[:, s0:s1], layer, topk, keep)
    m = stats.mass()
    assert m[layer].tolist() == pytest.approx([s / n for s, n in zip(want_sum, want_rows)])
    assert torch.isnan(m[0]).all()


# ---------------------------------------------------------------------- CSV
def test_matrix_csv() -> None:
    text = matrix_csv([[1.0, float("nan")], [0.25, 1.0]], "i/j")
    assert text == "i/j,0,1\n0,1.000000,nan\n1,0.250000,1.000000\n"


# ---------------------------------------------------------------------- model + CLI
@pytest.fixture(scope="module")
def megatron() -> None:
    from tests.helpers.megatron_env import init_single_process

    init_single_process()


def test_absorbed_qkv_reproduces_the_attention_output(megatron: None) -> None:
    """The tool recomputes each layer's absorbed q / latent kv from the layer's input; attending
    them over the layer's top-k must give exactly the layer's output (guards against drift from
    ``DSASelfAttention.forward``)."""
    from indexcache_train.model.toy_configs import glm5_toy_hf_config
    from indexcache_train.ops import api as ops
    from indexcache_train.tools.overlap_cli import (
        absorbed_qkv,
        all_full_trunk_config,
        attention_modules,
    )
    from tests.helpers.models import build_toy, state

    hf = glm5_toy_hf_config(num_hidden_layers=3, index_topk_freq=2, index_skip_topk_offset=1)
    cfg, model = build_toy(all_full_trunk_config(hf))
    assert cfg.schedule.pattern == "FFF" and cfg.num_mtp_layers == 0
    with torch.no_grad():  # peaky attention, so a wrong q or k cannot pass by averaging
        for a in attention_modules(model):
            a.linear_q_up_proj.weight.mul_(8)
            a.linear_kv_down_proj.weight.mul_(8)
    B, S = 2, 20
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))
    seen: dict[int, tuple] = {}

    def keep(mod, args, kwargs, out) -> None:
        seen[mod.layer_index] = (args[0], kwargs["dsa_state"], out[0])

    hooks = [a.register_forward_hook(keep, with_kwargs=True) for a in attention_modules(model)]
    st = state(cfg, B, S, captured_topk={})
    with torch.no_grad():
        model(ids, torch.arange(S).expand(B, S), None, dsa_state=st)
    for h in hooks:
        h.remove()
    for i, a in enumerate(attention_modules(model)):
        x, dsa_state, out = seen[i]
        q_abs, kv = absorbed_qkv(a, x, dsa_state)
        lat, _ = ops.sparse_mla(
            q_BSHD=q_abs,
            kv_BTD=kv,
            topk_BSK=st.captured_topk[i],
            softmax_scale=a.dims.softmax_scale,
            v_dim=a.dims.kv_lora_rank,
            backend="torch",
        )
        _, w_uv = a._kv_up_weights()
        o = torch.einsum("bshr,hvr->bshv", lat, w_uv).transpose(0, 1).reshape(S, B, -1)
        torch.testing.assert_close(a.linear_proj(o)[0], out, rtol=1e-5, atol=1e-6)


def _read_csv(path: Path) -> list[list[float]]:
    rows = list(csv.reader(path.open()))
    assert rows[0][1:] == [str(j) for j in range(len(rows) - 1)]
    return [[float(v) for v in r[1:]] for r in rows[1:]]


def _cli(*argv: str) -> int:
    from indexcache_train.tools.__main__ import main

    return main(["overlap", *argv])


def test_cli_end_to_end_on_toy_preset(megatron: None, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ("--model", "glm5_toy", "--data", "random", "--batches", "2", "--seq", "24")
    assert _cli(*args, "--out", str(out), "--device", "cpu") == 0
    printed = capsys.readouterr().out
    assert "own_mass" in printed and "overlap.png" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "mass.csv",
        "mass.png",
        "overlap.csv",
        "overlap.png",
    ]
    overlap, mass = _read_csv(out / "overlap.csv"), _read_csv(out / "mass.csv")
    L = 4
    assert len(overlap) == L and all(overlap[i][i] == 1.0 for i in range(L))
    assert all(overlap[i][j] == overlap[j][i] for i in range(L) for j in range(L))
    assert all(0.0 < v <= 1.0 for row in mass for v in row)
    for name in ("overlap.png", "mass.png"):
        pixels = read_png(out / name)
        assert pixels.shape[:2] == (560, 640) and pixels.std() > 0  # drawn, not blank
    # Refuses to overwrite without --overwrite; writes again with it.
    assert _cli(*args, "--out", str(out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _cli(*args, "--out", str(out), "--overwrite", "--device", "cpu") == 0
    short = ("--model", "glm5_toy", "--data", "random", "--batches", "1", "--seq", "8")
    assert _cli(*short, "--out", str(tmp_path / "short")) == 2  # toy index_topk is 8
    assert "index_topk" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hf_toys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.helpers.hf_toys import make_glm5_toy_config, save_toy_checkpoint

    root = tmp_path_factory.mktemp("overlap_hf")
    full = make_glm5_toy_config(num_hidden_layers=3, index_topk_freq=1)
    shared = make_glm5_toy_config(num_hidden_layers=3, index_topk_freq=2, index_skip_topk_offset=1)
    return {
        "full": save_toy_checkpoint(full, root / "full"),
        "shared": save_toy_checkpoint(shared, root / "shared"),
    }


def test_cli_on_hf_checkpoint_with_indexed_data(
    megatron: None, hf_toys: dict[str, Path], tmp_path: Path, capsys
) -> None:
    import numpy as np

    from indexcache_train.data.indexed_writer import AtomicIndexedDatasetWriter

    prefix = tmp_path / "calib"
    gen = np.random.default_rng(0)
    with AtomicIndexedDatasetWriter(prefix, np.uint16, overwrite=False) as w:
        for n in (30, 50):
            w.add_document(gen.integers(0, 128, n))
    out = tmp_path / "out"
    argv = ("--hf", str(hf_toys["full"]), "--batches", "2", "--seq", "40", "--device", "cpu")
    assert _cli(*argv, "--data", str(prefix), "--out", str(out)) == 0
    overlap = _read_csv(out / "overlap.csv")
    assert len(overlap) == 3 and overlap[1][1] == 1.0  # MTP layer not analysed
    # Too few tokens, a vocabulary mismatch (GPT-2 ids >= 128) and a missing prefix are refused.
    capsys.readouterr()
    src = ("--hf", str(hf_toys["full"]), "--data", str(prefix), "--seq", "40")
    assert _cli(*src, "--batches", "3", "--out", str(tmp_path / "a")) == 2  # 80 < 120 tokens
    assert "tokens" in capsys.readouterr().err
    assert _cli(*argv, "--data", "default", "--out", str(tmp_path / "b")) == 2
    assert "vocab_size" in capsys.readouterr().err
    assert _cli(*argv, "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "c")) == 2


def test_cli_refuses_checkpoint_whose_shared_layers_have_no_indexer(
    megatron: None, hf_toys: dict[str, Path], tmp_path: Path, capsys
) -> None:
    argv = ("--hf", str(hf_toys["shared"]), "--data", "random", "--batches", "1", "--seq", "16")
    assert _cli(*argv, "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "trunk layers [1]" in err and "all-Full" in err
    assert not (tmp_path / "o").exists()
