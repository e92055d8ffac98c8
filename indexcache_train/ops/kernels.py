"""GPU kernels behind :mod:`indexcache_train.ops.api` (filled by the GPU-kernel work).

Each ``HAVE_*`` flag says whether a fused kernel exists for that operator; the API falls back to
the PyTorch reference when it is ``False``.
"""

from __future__ import annotations

HAVE_INDEXER_TOPK = False
HAVE_SPARSE_MLA = False
HAVE_DENSE_ATTENTION = False


def indexer_topk(*args, **kwargs):  # pragma: no cover - replaced by the kernel module
    raise RuntimeError("no indexer top-k kernel is built in")


def sparse_mla(*args, **kwargs):  # pragma: no cover
    raise RuntimeError("no sparse MLA kernel is built in")


def dense_attention(*args, **kwargs):  # pragma: no cover
    raise RuntimeError("no dense attention kernel is built in")
