"""Row-block sparse MLA: the union plan (pure torch) and the kernels under the CPU interpreter.

The plan tests rebuild every row's key set from the plan's entries. The kernel cases run in one
``TRITON_INTERPRET=1`` worker subprocess (see ``test_kernels_interpret.py`` for why) at tiny MLA
shapes with correlated indices (neighbouring rows share keys), for the per-row path (the fused
single-launch backward at <= 32 matrix rows) and the row-block path (``ROW_BLOCK_MODE="force"``),
and hold them to the kernels' usual bar: error against the fp32 reference at most twice that of
the same computation in PyTorch bf16. The two paths, and the deterministic backward of each
(partial dKV rows reduced per key in a fixed order, run here in many small chunks), must also
agree with each other to fp32 summation order.
"""

from __future__ import annotations

import pytest
import torch

from indexcache_train.ops.sparse_plan import MEMBER_BITS, build_row_block_plan
from tests.helpers.interpreter import main_guard, run_interpreted

SLACK = 2.0
FLOOR = 1e-6


def _row_sets(plan, S: int) -> list[list[set[int]]]:
    out = []
    for b in range(plan.entries_BNU.shape[0]):
        rows = []
        for s in range(S):
            nb, r = divmod(s, plan.rows_per_block)
            e = plan.entries_BNU[b, nb]
            e = e[e >= 0].tolist()
            rows.append({x >> MEMBER_BITS for x in e if (x >> r) & 1})
        out.append(rows)
    return out


@pytest.mark.parametrize("bm", [2, 3, 4, 8])
def test_plan_rebuilds_every_row_set(bm: int) -> None:
    g = torch.Generator().manual_seed(bm)
    B, S, K = 2, 37, 9
    idx = torch.randint(0, 40, (B, S, K), generator=g, dtype=torch.int32)
    idx[0, 3, 4:] = -1  # trailing empty slots
    idx[1, 5] = -1  # a row without keys
    idx[1, 6, 0] = -1  # an empty slot first
    plan = build_row_block_plan(idx, bm, chunk_elems=64)  # several chunks of blocks
    want = [[{int(x) for x in idx[b, s] if x >= 0} for s in range(S)] for b in range(B)]
    assert _row_sets(plan, S) == want
    assert plan.num_blocks == -(-S // bm)
    e = plan.entries_BNU
    for b in range(B):
        for nb in range(plan.num_blocks):
            keys = [x >> MEMBER_BITS for x in e[b, nb].tolist() if x >= 0]
            assert keys == sorted(set(keys))  # ascending, unique
            assert len(keys) == int(plan.count_BN[b, nb])
            assert all(x == -1 for x in e[b, nb, len(keys) :].tolist())  # padding after


def test_plan_gain_counts_sharing() -> None:
    same = torch.arange(8, dtype=torch.int32).expand(1, 16, 8).contiguous()
    assert build_row_block_plan(same, 4).gain == 4.0  # identical rows: every key shared by 4
    disjoint = torch.arange(16 * 8, dtype=torch.int32).view(1, 16, 8)
    assert build_row_block_plan(disjoint, 4).gain == 1.0


def test_plan_rejects_bad_input() -> None:
    idx = torch.zeros(1, 4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="rows_per_block"):
        build_row_block_plan(idx, 1)
    with pytest.raises(ValueError, match="rows_per_block"):
        build_row_block_plan(idx, MEMBER_BITS + 1)
    with pytest.raises(ValueError, match=r"\[B, S, K\]"):
        build_row_block_plan(idx[0], 2)
    with pytest.raises(ValueError, match="key indices"):
        build_row_block_plan(idx + (1 << 23), 2)


def test_dispatch_uses_row_blocks_only_where_they_pay() -> None:
    from indexcache_train.ops import triton_sparse_mla as tsm

    assert tsm.rows_per_block(16) == 4 and tsm.rows_per_block(32) == 2
    assert tsm.rows_per_block(64) == 1 and tsm.rows_per_block(128) == 1
    assert tsm.bwd_launches(16) == ((True, True),)  # 16 heads per row: one fused launch
    assert len(tsm.bwd_launches(64)) == 2
    same = torch.arange(8, dtype=torch.int32).expand(1, 16, 8).contiguous()
    disjoint = torch.arange(16 * 8, dtype=torch.int32).view(1, 16, 8)
    shared, apart = tsm.row_block_plan(same, 16), tsm.row_block_plan(disjoint, 16)
    assert tsm._use_plan(shared, tsm.ROW_BLOCK_MIN_GAIN_FWD)
    assert not tsm._use_plan(apart, tsm.ROW_BLOCK_MIN_GAIN_BWD)
    assert tsm.row_block_plan(same, 16) is shared  # cached per index tensor
    assert tsm.row_block_plan(same, 64) is None  # 64 heads already fill a tile


# ----------------------------------------------------------------------------- kernels


def _cases() -> dict[str, dict[str, float]]:
    """Worker body (TRITON_INTERPRET=1, CPU tensors)."""
    from indexcache_train.ops import triton_sparse_mla as tsm
    from indexcache_train.ops.masking import KeyRange
    from tests.helpers import kernel_testing as tt
    from tests.helpers.sparse_indices import correlated_topk_indices

    def correlated(H: int):
        def make(B, S, K, device, key_range, gen):
            return correlated_topk_indices(
                B, S, K, 0.8, tsm.rows_per_block(H), device, key_range, gen
            )

        return make

    cases = {
        # name: (B, S, T, H, D, V, K, key_range)
        "h16_causal": (1, 29, 29, 16, 48, 32, 8, None),  # 4 rows x 16 heads, S % 4 != 0
        "h20_two_rows": (1, 23, 23, 20, 48, 32, 8, None),  # 2 rows x 32 (20 + 12 padded) heads
        "h16_packed": (
            2,
            30,
            30,
            16,
            96,
            64,
            12,
            # Rows 8..10 start their documents past themselves: no key at all (-inf LSE).
            KeyRange.build(2, 30, "cpu", key_start_BS=torch.tensor([0] * 8 + [20] * 3 + [11] * 19)),
        ),
    }
    res: dict[str, dict[str, float]] = {}
    # A partial-dKV buffer of a few KB: the deterministic backward runs in many chunks.
    tsm.DETERMINISTIC_BUFFER = 3 * 16 * 96 * 4 * 8
    for name, (B, S, T, H, D, V, K, kr) in cases.items():
        outs = {}
        for mode in ("off", "force", "off_det", "force_det"):
            tsm.ROW_BLOCK_MODE = mode.removesuffix("_det")
            tsm._PLAN_CACHE.clear()
            got = {}

            det = mode.endswith("_det")

            def impl(q, kv, idx, scale, v_dim, got=got, H=H, det=det):
                out, lse = tsm.sparse_mla_triton(q, kv, idx, scale, v_dim, det)
                got["plan"] = tsm.row_block_plan(idx, H)
                q.register_hook(lambda g: got.__setitem__("dq", g))
                kv.register_hook(lambda g: got.__setitem__("dkv", g))
                got["out"] = out
                return out, lse

            r = tt.check_sparse_mla(impl, B, S, T, H, D, V, K, kr, "cpu", 7, correlated(H))
            r["gain"] = got["plan"].gain if got["plan"] is not None else 0.0
            res[f"{name}_{mode}"] = r
            outs[mode] = {k: got[k].float() for k in ("out", "dq", "dkv")}
        res[name + "_paths"] = {
            f"{k}_{a}_vs_{b}": tt.rel_err(outs[a][k], outs[b][k])
            for k in ("out", "dq", "dkv")
            for a, b in (("force", "off"), ("off_det", "off"), ("force_det", "force"))
        }
    return res


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, float]]:
    pytest.importorskip("triton")
    return run_interpreted(__file__, timeout=600)


@pytest.mark.parametrize("mode", ["off", "force", "off_det", "force_det"])
@pytest.mark.parametrize("case", ["h16_causal", "h20_two_rows", "h16_packed"])
def test_row_block_kernels_interpret(
    results: dict[str, dict[str, float]], case: str, mode: str
) -> None:
    r = results[f"{case}_{mode}"]
    assert r["lse_inf_ok"] == 1.0
    for n in ("out", "lse", "dq", "dkv"):
        assert r[n] <= SLACK * r[n + "_bf16"] + FLOOR, (n, r)
    if mode.startswith("force"):
        assert r["gain"] > 1.2, r  # the correlated indices really share keys
    if case == "h16_packed":
        assert r["rows_with_empty_slots"] > 0


@pytest.mark.parametrize("case", ["h16_causal", "h20_two_rows", "h16_packed"])
def test_paths_agree(results: dict[str, dict[str, float]], case: str) -> None:
    """Row-block vs per-row, and each deterministic backward vs its atomic one: the same math
    in another fp32 summation order, far below the kernels' own bf16 error (~3e-3 here)."""
    for k, v in results[case + "_paths"].items():
        assert v < 1e-3, (k, results[case + "_paths"])


if __name__ == "__main__":
    main_guard(_cases)
