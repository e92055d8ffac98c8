"""Attention, indexer and distillation-loss operators.

Every operator has a PyTorch reference implementation (``*_reference`` modules: chunked so no
``[seq, seq]`` tensor ever exists, custom autograd that recomputes per chunk in backward) that
runs on CPU and is the ground truth for tests; GPU kernels plug in behind the same functions
(:mod:`~indexcache_train.ops.api`) through the kernel-backend table
(:mod:`~indexcache_train.ops.backends`).

Shape legend (batch-first inside ops; Megatron's sequence-first tensors are transposed once at
the module boundary):

    B batch            S query rows (local)      T key rows (global, key order)
    H attention heads  I indexer heads           D head / feature dim
    K top-k slots      V value dim               C query chunk

Masking is expressed per query row, which covers causal, packed documents and context parallel
at once: query row ``s`` may attend key ``t`` iff ``key_start[b, s] <= t <= query_index[b, s]``.
``query_index`` is the query's own position in key order (``arange(S)`` for plain causal);
``key_start`` is the first key of its document (0 without packing).
"""
