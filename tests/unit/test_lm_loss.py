"""Chunked LM head + cross-entropy: the same per-token loss and gradients as Megatron's
whole-sequence path, without saving a whole sequence's logits for the backward."""

from __future__ import annotations

import pytest
import torch

from indexcache_train.model.forward_state import DistillSettings
from indexcache_train.model.lm_loss import chunk_positions, chunked_lm_loss
from indexcache_train.model.toy_configs import glm5_toy_hf_config
from tests.helpers.megatron_env import init_single_process
from tests.helpers.models import build_toy, state

pytestmark = pytest.mark.unit
B, S = 2, 40


@pytest.fixture(scope="module", autouse=True)
def _megatron() -> None:
    init_single_process()


def test_positions_after_the_tensor_parallel_gather() -> None:
    # 8 positions over TP=2 (4 local rows each): local rows 1..2 are positions 1,2 and 5,6.
    assert chunk_positions(8, 4, 1, 3).tolist() == [1, 2, 5, 6]
    assert chunk_positions(6, 6, 0, 6).tolist() == list(range(6))


def _run(chunk: int, seed: int = 0):
    torch.manual_seed(seed)
    # No MTP: its logits (Megatron's process_mtp_loss) are not chunked.
    hf = glm5_toy_hf_config(
        num_mtp_layers=0, num_hidden_layers=2, index_topk_freq=2, index_skip_topk_offset=1
    )
    cfg, model = build_toy(hf, lm_loss_chunk=chunk)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))
    st = state(cfg, B, S, attention="sparse", distill=DistillSettings(mode="multi"))
    saved: list[int] = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() and t.shape[-1] == cfg.vocab_size:  # logits-shaped (the output weight is [V, H])
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_BS = model(
            ids, torch.arange(S).expand(B, S), None, labels=ids.roll(-1, 1), dsa_state=st
        )
    loss_BS.mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return cfg, loss_BS.detach(), grads, max(saved)


@pytest.mark.parametrize("chunk", [7, 16, 40])
def test_chunked_equals_whole_sequence(chunk: int) -> None:
    cfg, ref, ref_grads, ref_max_saved = _run(0)
    _, got, grads, max_saved = _run(chunk)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    whole_logits = S * B * cfg.vocab_size
    # Megatron's path saves the whole sequence's logits (or their softmax) for the backward;
    # the chunked path saves no logits at all (each chunk's are recomputed in the backward).
    assert ref_max_saved >= whole_logits
    assert max_saved == 0


def test_bad_chunk_is_refused() -> None:
    with pytest.raises(ValueError, match="chunk must be > 0"):
        chunked_lm_loss(0)
