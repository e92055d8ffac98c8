"""Row-wise key-range masks shared by every reference operator."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KeyRange:
    """Per-query valid key range ``[key_start, query_index]`` (inclusive), both ``[B, S]`` int64."""

    query_index_BS: torch.Tensor
    key_start_BS: torch.Tensor

    @staticmethod
    def causal(batch: int, seq: int, device: torch.device | str) -> KeyRange:
        idx_S = torch.arange(seq, device=device)
        return KeyRange(
            idx_S.expand(batch, seq), torch.zeros(batch, seq, dtype=torch.long, device=device)
        )

    @staticmethod
    def build(
        batch: int,
        seq: int,
        device: torch.device | str,
        query_index_BS: torch.Tensor | None = None,
        key_start_BS: torch.Tensor | None = None,
    ) -> KeyRange:
        base = KeyRange.causal(batch, seq, device)
        qi = (
            base.query_index_BS if query_index_BS is None else query_index_BS.to(device, torch.long)
        )
        ks = base.key_start_BS if key_start_BS is None else key_start_BS.to(device, torch.long)
        return KeyRange(qi.expand(batch, seq), ks.expand(batch, seq))

    def rows(self, start: int, end: int) -> KeyRange:
        return KeyRange(self.query_index_BS[:, start:end], self.key_start_BS[:, start:end])

    def dense_mask(self, num_keys: int) -> torch.Tensor:
        """``[B, C, T]`` bool validity for the rows this range holds (a query chunk, never [S, T])."""
        t_T = torch.arange(num_keys, device=self.query_index_BS.device)
        return (t_T >= self.key_start_BS[..., None]) & (t_T <= self.query_index_BS[..., None])

    def topk_mask(self, idx_BSK: torch.Tensor) -> torch.Tensor:
        """Validity of gathered top-k slots: index >= 0 and inside the row's key range."""
        idx = idx_BSK.long()
        return (
            (idx >= 0)
            & (idx >= self.key_start_BS[..., None])
            & (idx <= self.query_index_BS[..., None])
        )

    def num_valid(self) -> torch.Tensor:
        """Number of valid keys per row, ``[B, S]``."""
        return (self.query_index_BS - self.key_start_BS + 1).clamp_min(0)


def chunks(total: int, chunk: int) -> list[tuple[int, int]]:
    if chunk <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk}")
    return [(s, min(s + chunk, total)) for s in range(0, total, chunk)]


def acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: fp32 for bf16/fp16/fp32 inputs, fp64 stays fp64 (exactness tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
