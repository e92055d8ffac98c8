"""Packed sequences (documents never attend across boundaries) and context-parallel index maths."""

from __future__ import annotations

import pytest
import torch

from indexcache_train.data.packing import PackingError, from_cu_seqlens, from_eod, pad_to_multiple
from indexcache_train.model.toy_configs import glm5_toy_hf_config
from indexcache_train.ops.masking import KeyRange
from indexcache_train.parallel.context_parallel import (
    gathered_to_natural,
    split_for_rank,
    zigzag_positions,
)
from tests.helpers.megatron_env import init_single_process
from tests.helpers.models import build_toy, state


def test_zigzag_positions_cover_the_sequence_once() -> None:
    cp, S = 4, 32
    held = torch.cat([zigzag_positions(S, cp, r) for r in range(cp)])
    assert sorted(held.tolist()) == list(range(S))
    assert zigzag_positions(S, cp, 0).tolist() == [0, 1, 2, 3, 28, 29, 30, 31]
    gathered = torch.cat([split_for_rank(torch.arange(S)[None], cp, r) for r in range(cp)], dim=1)[
        0
    ]
    assert torch.equal(gathered[gathered_to_natural(S // cp, cp)], torch.arange(S))
    with pytest.raises(ValueError, match="divisible by 2"):
        zigzag_positions(30, 4, 0)


def test_layout_from_cu_seqlens_and_eod_agree() -> None:
    eod = 9
    tokens = torch.tensor([[1, 2, eod, 3, 4, 5, eod, 6]])
    a = from_eod(tokens, eod)
    b = from_cu_seqlens(torch.tensor([0, 3, 7, 8]), torch.tensor([0, 1, 2, 0, 1, 2, 3, 0]))
    assert torch.equal(a.position_ids_BS, b.position_ids_BS) and torch.equal(
        a.key_start_BS, b.key_start_BS
    )
    assert a.key_start_BS.tolist() == [[0, 0, 0, 3, 3, 3, 3, 7]]


@pytest.mark.parametrize(
    "cu,pos,match",
    [
        ([0, 3, 8], None, "explicit per-document position_ids"),
        ([0, 3, 8], list(range(8)), "must restart at 0"),
        ([0, 5, 3], list(range(3)), "non-decreasing"),
        ([0, 3, 7], [0, 1, 2, 0, 1, 2, 3, 4], "ends at 7"),
    ],
)
def test_cu_seqlens_errors(cu, pos, match) -> None:
    with pytest.raises(PackingError, match=match):
        from_cu_seqlens(torch.tensor(cu), None if pos is None else torch.tensor(pos), total=8)


def test_padding_is_its_own_document() -> None:
    tokens, pad = pad_to_multiple(torch.tensor([[1, 2, 9, 3, 4]]), 4, eod=9)
    assert pad == 3 and tokens.shape == (1, 8)
    layout = from_eod(tokens, 9, num_pad=pad)
    assert layout.key_start_BS[0].tolist() == [
        0,
        0,
        0,
        3,
        3,
        5,
        6,
        7,
    ]  # each pad token attends only itself


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_packed_documents_equal_documents_run_one_by_one(attention: str) -> None:
    init_single_process()
    cfg, model = build_toy(
        glm5_toy_hf_config(
            num_hidden_layers=4, index_topk_freq=2, index_skip_topk_offset=1, num_mtp_layers=0
        )
    )
    model.eval()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (7, 13, 12)]
    packed = torch.cat(docs)[None]
    cu = torch.tensor([0, 7, 20, 32])
    pos = torch.cat([torch.arange(len(d)) for d in docs])
    layout = from_cu_seqlens(cu, pos)
    st = state(
        cfg,
        1,
        32,
        attention=attention,
        key_range=KeyRange.build(1, 32, "cpu", None, layout.key_start_BS),
    )
    st.position_ids_BS = layout.position_ids_BS
    with torch.no_grad():
        out_packed = model(packed, layout.position_ids_BS, None, dsa_state=st)[0]
        outs = []
        for d in docs:
            n = len(d)
            outs.append(
                model(
                    d[None],
                    torch.arange(n)[None],
                    None,
                    dsa_state=state(cfg, 1, n, attention=attention),
                )[0]
            )
    torch.testing.assert_close(out_packed, torch.cat(outs), rtol=1e-5, atol=1e-5)
