"""Cross-layer top-k overlap and attention-mass metrics (the paper's Fig. 3 analysis), pure torch.

IndexCache (arXiv 2603.12201, section 2) motivates sharing by how similar adjacent layers' DSA
selections are. For every pair of layers (i, j), over the query rows of calibration data:

* **overlap** ``O[i, j] = mean_rows |T_i ∩ T_j| / k`` where ``T_i`` is layer i's own top-k set;
  symmetric, 1 on the diagonal.
* **attention mass** ``M[i, j] = mean_rows sum_{t in T_j} p_i(t)`` where ``p_i`` is layer i's
  attention distribution over *all* valid keys, summed over heads and L1-normalised (the
  distillation target of the indexcache-facts, section 4). ``M[i, i]`` is what layer i's own
  selection captures; ``M[i, j]`` what it would capture reusing layer j's (a Shared layer i
  with source j). Not symmetric.

Rows: a row counts for pair (i, j) only when both ``T_i`` and ``T_j`` hold k valid keys (``-1``
marks an empty slot, :mod:`indexcache_train.ops.masking`; a row with fewer than k valid keys
selects all of them, so it says nothing about the selection), and when the optional ``rows_BS``
mask allows it. Overlap and mass use the same rows, so the two matrices are comparable.

Sums and row counts are kept apart (float64) so batches can be added before dividing, as
:mod:`indexcache_train.loss.recall` does. Memory: one query chunk at a time; the largest
temporaries are ``[L, B, C, K]`` and ``[B, C, T]`` (no ``[S, T]`` tensor).

Shape legend: L layers, B batch, S query rows, C rows of one chunk, T keys, K top-k slots.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from indexcache_train.ops.masking import chunks

#: ``probs_fn(s0, s1)`` -> non-negative attention weights of rows ``s0:s1`` over all keys,
#: ``[B, s1-s0, T]`` (any per-row scale: rows are L1-normalised here).
ProbsFn = Callable[[int, int], torch.Tensor]


def full_rows(topk_LBSK: torch.Tensor) -> torch.Tensor:
    """``[L, B, S]`` bool: the row's set holds k valid keys (no ``-1`` slot)."""
    return (topk_LBSK >= 0).all(-1)


def _spare(idx_XK: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Indices as int64 with empty slots sent to a spare column ``num_keys`` (never a hit)."""
    idx = idx_XK.long()
    return torch.where(idx >= 0, idx, num_keys)


def _num_keys(topk_LBSK: torch.Tensor) -> int:
    return int(topk_LBSK.max().clamp_min(0)) + 1


def _pair_rows(full_LBC: torch.Tensor, i: int, rows_BC: torch.Tensor | None) -> torch.Tensor:
    """``[L, B, C]``: rows counted for pairs (i, j) for every j."""
    ok = full_LBC & full_LBC[i]
    return ok if rows_BC is None else ok & rows_BC


@torch.no_grad()
def overlap_sums(
    topk_LBSK: torch.Tensor, rows_BS: torch.Tensor | None = None, chunk: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum over rows of |T_i ∩ T_j| / k, rows)``, both ``[L, L]`` float64.

    Args:
        topk_LBSK: every layer's own top-k indices (``-1`` = empty slot); k is the last dim.
        rows_BS: optional extra row mask (e.g. rows with more than k valid keys).
        chunk: query rows per step.
    """
    L, _, S, K = topk_LBSK.shape
    dev = topk_LBSK.device
    sums = torch.zeros(L, L, dtype=torch.float64, device=dev)
    rows = torch.zeros(L, L, dtype=torch.float64, device=dev)
    if K == 0:
        return sums, rows
    T = _num_keys(topk_LBSK)
    for s0, s1 in chunks(S, chunk):
        idx_LBCK = _spare(topk_LBSK[:, :, s0:s1], T)
        full_LBC = full_rows(topk_LBSK[:, :, s0:s1])
        extra = None if rows_BS is None else rows_BS[:, s0:s1]
        for i in range(L):
            member_BCT = torch.zeros(*idx_LBCK.shape[1:3], T + 1, dtype=torch.bool, device=dev)
            member_BCT.scatter_(-1, idx_LBCK[i], True)
            member_BCT[..., T] = False
            hits_LBC = member_BCT.expand(L, -1, -1, -1).gather(-1, idx_LBCK).sum(-1)
            ok_LBC = _pair_rows(full_LBC, i, extra)
            sums[i] += (hits_LBC.double() / K).mul(ok_LBC).sum((1, 2))
            rows[i] += ok_LBC.sum((1, 2))
    return sums, rows


@torch.no_grad()
def mass_sums(
    probs_fn: ProbsFn,
    layer: int,
    topk_LBSK: torch.Tensor,
    rows_BS: torch.Tensor | None = None,
    chunk: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``layer`` of the mass matrix: ``(sum over rows of p_layer(T_j), rows)``, ``[L]`` each.

    Args:
        probs_fn: layer ``layer``'s head-summed attention over all keys, by query chunk.
        layer: which layer's attention ``probs_fn`` gives (its own set is ``topk_LBSK[layer]``).
        topk_LBSK: every layer's own top-k indices (``-1`` = empty slot).
        rows_BS: optional extra row mask; rows whose attention sums to 0 are always skipped.
    """
    L, _, S, _ = topk_LBSK.shape
    dev = topk_LBSK.device
    sums = torch.zeros(L, dtype=torch.float64, device=dev)
    rows = torch.zeros(L, dtype=torch.float64, device=dev)
    for s0, s1 in chunks(S, chunk):
        p_BCT = probs_fn(s0, s1).double()
        T = p_BCT.shape[-1]
        total_BC = p_BCT.sum(-1)
        p_BCT = torch.nn.functional.pad(p_BCT / total_BC.clamp_min(1e-300)[..., None], (0, 1))
        idx_LBCK = _spare(topk_LBSK[:, :, s0:s1], T)
        got_LBC = p_BCT.expand(L, -1, -1, -1).gather(-1, idx_LBCK).sum(-1)
        extra = total_BC > 0
        if rows_BS is not None:
            extra = extra & rows_BS[:, s0:s1]
        ok_LBC = _pair_rows(full_rows(topk_LBSK[:, :, s0:s1]), layer, extra)
        sums += got_LBC.mul(ok_LBC).sum((1, 2))
        rows += ok_LBC.sum((1, 2))
    return sums, rows


@dataclass
class OverlapStats:
    """Running sums over calibration batches; :meth:`overlap` / :meth:`mass` give the means."""

    overlap_sum: torch.Tensor
    overlap_rows: torch.Tensor
    mass_sum: torch.Tensor
    mass_rows: torch.Tensor

    @classmethod
    def zeros(cls, num_layers: int) -> OverlapStats:
        z = lambda: torch.zeros(num_layers, num_layers, dtype=torch.float64)  # noqa: E731
        return cls(z(), z(), z(), z())

    def add_overlap(self, topk_LBSK: torch.Tensor, rows_BS: torch.Tensor | None = None) -> None:
        s, n = overlap_sums(topk_LBSK, rows_BS)
        self.overlap_sum += s.cpu()
        self.overlap_rows += n.cpu()

    def add_mass(
        self,
        probs_fn: ProbsFn,
        layer: int,
        topk_LBSK: torch.Tensor,
        rows_BS: torch.Tensor | None = None,
        chunk: int = 128,
    ) -> None:
        s, n = mass_sums(probs_fn, layer, topk_LBSK, rows_BS, chunk)
        self.mass_sum[layer] += s.cpu()
        self.mass_rows[layer] += n.cpu()

    def overlap(self) -> torch.Tensor:
        """``[L, L]`` mean overlap; NaN where no row counted."""
        return _mean(self.overlap_sum, self.overlap_rows)

    def mass(self) -> torch.Tensor:
        """``[L, L]`` mean mass of layer i's attention on layer j's top-k; NaN where no row."""
        return _mean(self.mass_sum, self.mass_rows)


def _mean(sums: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.where(rows > 0, sums / rows.clamp_min(1), torch.full_like(sums, math.nan))


def matrix_csv(matrix: Sequence[Sequence[float]], corner: str) -> str:
    """CSV text: header ``corner,0,1,...``, then one row per layer ``i,v_i0,v_i1,...``
    (6 decimals; ``nan`` where no row counted)."""
    n = len(matrix)
    lines = [",".join([corner, *(str(j) for j in range(n))])]
    for i, row in enumerate(matrix):
        cells = ("nan" if math.isnan(v) else f"{v:.6f}" for v in row)
        lines.append(",".join([str(i), *cells]))
    return "\n".join(lines) + "\n"
