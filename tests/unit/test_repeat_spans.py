"""The repeated-spans augmentation: seeded per sample, exact copies, training split only."""

from __future__ import annotations

import pytest
import torch

from indexcache_train.config.compose import compose
from indexcache_train.config.validate import ConfigError, validate
from indexcache_train.data.builder import build_datasets
from indexcache_train.data.config import DataConfig, DataConfigError
from indexcache_train.data.repeat_spans import RepeatSpans

S = 256
SPAN, COUNT = 8, 4


class _Distinct:
    """Samples of distinct tokens (a copy is the only way two positions match), EOD every 50."""

    def __init__(self, n: int = 400) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        seq_N = torch.arange(S + 1, dtype=torch.int64) + 1000 * idx
        loss_mask_S = torch.ones(S, dtype=torch.float32)
        loss_mask_S[::50] = 0.0  # as eod_mask_loss would for EOD inputs
        return {
            "tokens": seq_N[:-1].clone(),
            "labels": seq_N[1:].clone(),
            "loss_mask": loss_mask_S,
            "position_ids": torch.arange(S),
            "dataset_id": torch.tensor(idx % 3),
        }


def _wrap(fraction: float, seed: int = 5, n: int = 400) -> RepeatSpans:
    return RepeatSpans(
        _Distinct(n), seq_length=S, seed=seed, fraction=fraction, span=SPAN, count=COUNT
    )


def _changed(sample: dict, plain: dict) -> torch.Tensor:
    return sample["tokens"] != plain["tokens"]


def test_deterministic_per_seed_and_index():
    a, b, other = _wrap(0.5), _wrap(0.5), _wrap(0.5, seed=6)
    order = [7, 3, 120, 3, 7]  # any order, any repeat: the same sample
    for i in order:
        assert torch.equal(a[i]["tokens"], b[i]["tokens"])
        assert torch.equal(a[i]["tokens"], a[i]["tokens"])
    assert any(not torch.equal(a[i]["tokens"], other[i]["tokens"]) for i in range(40))


def test_fraction_zero_returns_the_samples_unchanged():
    plain, wrapped = _Distinct(), _wrap(0.0)
    assert len(wrapped) == len(plain)
    for i in range(50):
        got, want = wrapped[i], plain[i]
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_fraction_one_copies_every_span_and_keeps_labels_shifted():
    plain, n_moved = _Distinct(), []
    for i in range(100):
        got, want = _wrap(1.0)[i], plain[i]
        assert torch.equal(got["labels"][:-1], got["tokens"][1:])
        seq_N = torch.cat([got["tokens"], got["labels"][-1:]])
        # Every token is still one of the sample's own (distinct) tokens; the copied ones map to
        # an earlier position at a distance >= SPAN.
        src_N = seq_N - 1000 * i
        pos_N = torch.arange(S + 1)
        moved = src_N != pos_N
        assert bool((src_N[moved] <= pos_N[moved] - SPAN).all())
        # COUNT spans were written: at least the last one is whole, and no more than COUNT *
        # SPAN positions changed (earlier spans may be overwritten by later ones).
        assert SPAN <= int(moved.sum()) <= COUNT * SPAN
        n_moved.append(int(moved.sum()))
        starts = [p for p in range(S + 2 - SPAN) if bool(moved[p : p + SPAN].all())]
        assert any(
            bool((src_N[p : p + SPAN] == src_N[p] + torch.arange(SPAN)).all()) for p in starts
        )
        assert torch.equal(got["position_ids"], want["position_ids"])
        assert torch.equal(got["dataset_id"], want["dataset_id"])
    # COUNT spans, not fewer: COUNT - 1 could move at most (COUNT - 1) * SPAN (measured mean 30
    # of 32 at these sizes; spans that overlap move fewer).
    assert sum(n_moved) / len(n_moved) > (COUNT - 1) * SPAN


def test_loss_mask_moves_with_the_copied_inputs():
    plain, moved_masked = _Distinct(), 0
    for i in range(100):
        got, want = _wrap(1.0)[i], plain[i]
        src_S = got["tokens"] - 1000 * i  # where each input token came from
        assert torch.equal(got["loss_mask"], want["loss_mask"][src_S])
        moved_masked += int((got["loss_mask"] != want["loss_mask"]).sum())
    assert moved_masked > 0  # some copies did carry a masked (EOD) position along


def test_fraction_half_augments_about_half():
    wrapped, plain = _wrap(0.5), _Distinct()
    augmented = sum(bool(_changed(wrapped[i], plain[i]).any()) for i in range(400))
    # Binomial(400, 0.5): sd 10, so [140, 260] is 6 sd either side.
    assert 140 <= augmented <= 260


def test_a_span_that_does_not_fit_twice_is_refused():
    with pytest.raises(DataConfigError, match=r"data.repeat_span=129 .* <= 128"):
        RepeatSpans(_Distinct(), seq_length=S, seed=0, fraction=1.0, span=129, count=1)
    RepeatSpans(_Distinct(), seq_length=S, seed=0, fraction=1.0, span=128, count=1)


def test_build_datasets_augments_train_only(tmp_path):
    kw = {"seq_length": 64, "train_samples": 40, "valid_samples": 40, "seed": 3}
    plain = DataConfig(cache_dir=str(tmp_path))
    rep = DataConfig(cache_dir=str(tmp_path), repeat_fraction=1.0, repeat_span=8, repeat_count=2)
    train0, valid0 = build_datasets(plain, **kw)
    train1, valid1 = build_datasets(rep, **kw)
    assert isinstance(train1, RepeatSpans) and not isinstance(valid1, RepeatSpans)
    n = min(len(valid0), 40)
    assert all(torch.equal(valid0[i]["tokens"], valid1[i]["tokens"]) for i in range(n))
    changed = [not torch.equal(train0[i]["tokens"], train1[i]["tokens"]) for i in range(40)]
    assert sum(changed) >= 35  # a copy may, rarely, repeat what was already there
    with pytest.raises(DataConfigError, match=r"data.repeat_span=40 .* <= 32"):
        build_datasets(
            DataConfig(cache_dir=str(tmp_path), repeat_fraction=0.5, repeat_span=40), **kw
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repeat_fraction": -0.1}, r"data.repeat_fraction must be in \[0, 1\]"),
        ({"repeat_fraction": 1.5}, r"data.repeat_fraction must be in \[0, 1\]"),
        ({"repeat_span": 1}, "data.repeat_span must be >= 2"),
        ({"repeat_count": 0}, "data.repeat_count must be >= 1"),
        (
            {"repeat_fraction": 0.5, "pack_documents": True},
            "data.repeat_fraction=0 or data.pack_documents=false",
        ),
    ],
)
def test_repeat_config_errors(kwargs, message):
    with pytest.raises(DataConfigError, match=message):
        DataConfig(**kwargs)


def test_config_validation_refuses_a_span_too_long_for_the_model():
    overrides = ["+experiment=toy", "model.seq_length=128", "data.repeat_fraction=0.5"]
    validate(compose([*overrides, "data.repeat_span=64"]), 1)
    with pytest.raises(ConfigError, match=r"data.repeat_span=65 .* <= 64"):
        validate(compose([*overrides, "data.repeat_span=65"]), 1)
