"""The IndexCache schedule against transformers 5.17 and Megatron-Core 0.19.2 conventions."""

from __future__ import annotations

import pytest

from indexcache_train.schedule import IndexCacheSchedule, ScheduleError

GLM5_SEARCHED = "FFSFSSSFSSFSFSSSSSSSFSSSSSSFSSSFSFSSSSFFFFFSSSFFSSSFSSSSSSSSFSSSFSSSSSSFSFSSSS"
PAPER_30B = "FSFSFSSSSFSSSFSSFFSSFSSFSSSSFSSSFSSSSFSSSSSSSSS"


def test_glm52_freq4_offset3() -> None:
    s = IndexCacheSchedule.from_freq_offset(78, 4, 3, num_mtp_layers=1)
    full = set(s.trunk_full_layers)
    assert full == {0, 1, 2} | set(range(6, 78, 4))
    assert len(full) == 21 and s.num_layers - len(full) == 57
    assert s.mtp_indexer_types == ("full",) and s.is_full(78) and s.source(78) == 78
    assert [s.source(i) for i in (3, 4, 5, 7, 8, 9, 75, 76, 77)] == [2, 2, 2, 6, 6, 6, 74, 74, 74]
    assert s.groups[2].members == (2, 3, 4, 5)


@pytest.mark.parametrize("freq", range(1, 6))
@pytest.mark.parametrize("offset", range(0, 6))
def test_roles_match_transformers(freq: int, offset: int) -> None:
    from transformers import GlmMoeDsaConfig

    n = 23
    hf = GlmMoeDsaConfig(
        num_hidden_layers=n, index_topk_freq=freq, index_skip_topk_offset=offset
    ).indexer_types
    if hf[0] == "shared":
        # HF builds it, then fails at runtime ("Shared DSA layers require top-k ..."): we refuse early.
        with pytest.raises(ScheduleError, match="layer 0"):
            IndexCacheSchedule.from_freq_offset(n, freq, offset)
        return
    assert list(IndexCacheSchedule.from_freq_offset(n, freq, offset).indexer_types) == hf
    ours = IndexCacheSchedule.from_hf_config(
        {"num_hidden_layers": n, "index_topk_freq": freq, "index_skip_topk_offset": offset}
    )
    assert list(ours.indexer_types) == hf


@pytest.mark.parametrize("freq", range(1, 6))
@pytest.mark.parametrize("offset", range(0, 6))
def test_roles_match_megatron(freq: int, offset: int) -> None:
    from megatron.core.transformer.experimental_attention_variant.dsa import (
        is_dsa_skip_topk_layer,
        source_dsa_compute_layer,
    )

    n = 23
    # Megatron-Core clamps dsa_indexer_skip_topk_offset to >= 1 (is_dsa_skip_topk_layer).
    s = IndexCacheSchedule.from_freq_offset(n, freq, max(offset, 1), num_mtp_layers=1)
    for i in range(n + 1):
        assert s.is_full(i) == (not is_dsa_skip_topk_layer(i + 1, offset, freq)), i
        if i < n:
            assert s.source(i) + 1 == source_dsa_compute_layer(i + 1, offset, freq), i


def test_hf_default_offset_is_two_when_missing() -> None:
    from transformers import GlmMoeDsaConfig

    s = IndexCacheSchedule.from_hf_config({"num_hidden_layers": 12, "index_topk_freq": 3})
    assert (
        list(s.indexer_types)
        == GlmMoeDsaConfig(num_hidden_layers=12, index_topk_freq=3).indexer_types
    )
    assert s.index_skip_topk_offset == 2


def test_our_yaml_requires_offset() -> None:
    with pytest.raises(ScheduleError, match="explicit index_skip_topk_offset"):
        IndexCacheSchedule.from_keys(8, index_topk_freq=4)
    assert (
        IndexCacheSchedule.from_keys(8, index_topk_freq=4, index_skip_topk_offset=3).pattern
        == "FFFSSSFS"
    )


@pytest.mark.parametrize("pattern,mtp", [(GLM5_SEARCHED, 1), (PAPER_30B, 0), ("F" * 10, 1)])
def test_patterns_round_trip_through_export(pattern: str, mtp: int) -> None:
    n = len(pattern)
    s = IndexCacheSchedule.from_pattern(pattern, n, mtp)
    exported = {"num_hidden_layers": n, **s.to_hf_config()}
    back = IndexCacheSchedule.from_hf_config(exported, num_mtp_layers=mtp)
    assert back == s and back.pattern == pattern


def test_searched_pattern_exports_pattern_with_neutral_freq() -> None:
    keys = IndexCacheSchedule.from_pattern(GLM5_SEARCHED, 78, 1).to_hf_config()
    assert keys["index_topk_pattern"] == GLM5_SEARCHED and keys["index_topk_freq"] == 1
    assert keys["indexer_types"][:4] == ["full", "full", "shared", "full"]


def test_periodic_exports_freq_offset_and_transformers_agrees() -> None:
    from transformers import GlmMoeDsaConfig

    s = IndexCacheSchedule.from_freq_offset(78, 4, 3, 1)
    keys = s.to_hf_config()
    assert (
        keys["index_topk_freq"],
        keys["index_skip_topk_offset"],
        keys["index_topk_pattern"],
    ) == (4, 3, None)
    assert GlmMoeDsaConfig(num_hidden_layers=78, **keys).indexer_types == list(s.indexer_types)
    # A pattern that happens to be periodic is recognised as such.
    assert IndexCacheSchedule.from_pattern(s.pattern, 78, 1).to_hf_config()["index_topk_freq"] == 4


def test_precedence_and_conflicts() -> None:
    types = ["full", "shared", "full", "shared"]
    s = IndexCacheSchedule.from_hf_config(
        {"num_hidden_layers": 4, "indexer_types": types, "index_topk_pattern": "FSFS"}
    )
    assert list(s.indexer_types) == types
    with pytest.raises(ScheduleError, match="disagrees"):
        IndexCacheSchedule.from_hf_config(
            {"num_hidden_layers": 4, "indexer_types": types, "index_topk_pattern": "FFSS"}
        )
    with pytest.raises(ScheduleError, match="disagrees"):
        IndexCacheSchedule.from_hf_config(
            {
                "num_hidden_layers": 4,
                "index_topk_pattern": "FFSS",
                "index_topk_freq": 2,
                "index_skip_topk_offset": 1,
            }
        )
    # freq 1 is neutral next to a pattern (our own export writes it so).
    assert (
        IndexCacheSchedule.from_hf_config(
            {"num_hidden_layers": 4, "index_topk_pattern": "FFSS", "index_topk_freq": 1}
        ).pattern
        == "FFSS"
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"pattern": "SFFF"}, "starts with a Shared"),
        ({"pattern": "FFF"}, "has 3 entries"),
        ({"pattern": "FXSF"}, "unknown character"),
        ({"freq": 0}, "index_topk_freq=0"),
        ({"freq": 2, "offset": -1}, "index_skip_topk_offset=-1"),
        ({"types": ["full", "dense", "full", "full"]}, "'full' or 'shared'"),
    ],
)
def test_invalid_inputs(kwargs: dict, match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        if "pattern" in kwargs:
            IndexCacheSchedule.from_pattern(kwargs["pattern"], 4)
        elif "types" in kwargs:
            IndexCacheSchedule.from_indexer_types(kwargs["types"], 4)
        else:
            IndexCacheSchedule.from_freq_offset(4, kwargs["freq"], kwargs.get("offset", 1))


def test_shared_mtp_layer_reuses_trunk() -> None:
    # freq 4 / offset 2 (the HF default offset): global index 78 -> max(77, 0) % 4 != 0 -> Shared.
    s = IndexCacheSchedule.from_freq_offset(78, 4, 2, num_mtp_layers=1)
    assert not s.is_full(78) and s.source(78) == 77 and s.is_full(77) and s.is_mtp(78)
    assert s.consumers(77) == (78,)


def test_share_for_mtp_iteration_is_carried_not_interpreted() -> None:
    cfg = {
        "num_hidden_layers": 8,
        "index_topk_freq": 2,
        "index_skip_topk_offset": 1,
        "index_share_for_mtp_iteration": True,
    }
    s = IndexCacheSchedule.from_hf_config(cfg, num_mtp_layers=1)
    assert s.to_hf_config()["index_share_for_mtp_iteration"] is True
    assert s.mtp_indexer_types == IndexCacheSchedule.from_freq_offset(8, 2, 1, 1).mtp_indexer_types


def test_mtp_role_follows_freq_offset_when_list_covers_trunk_only() -> None:
    # transformers' config.json carries indexer_types (trunk only) *and* the freq/offset it came from.
    from transformers import GlmMoeDsaConfig

    cfg = GlmMoeDsaConfig(
        num_hidden_layers=4, index_topk_freq=2, index_skip_topk_offset=2
    ).to_dict()
    s = IndexCacheSchedule.from_hf_config(cfg, num_mtp_layers=1)
    assert s.pattern == "FFSF" and s.mtp_indexer_types == ("shared",) and s.source(4) == 3
    # Without freq/offset a trunk-only list keeps MTP layers Full (SGLang's is_nextn rule).
    only_types = IndexCacheSchedule.from_hf_config(
        {"num_hidden_layers": 4, "indexer_types": cfg["indexer_types"]}, 1
    )
    assert only_types.mtp_indexer_types == ("full",)
