"""Distillation loss plumbing: terms into Megatron's backward, and the recall metric (pure torch).

The terms themselves are operators (:func:`indexcache_train.ops.api.sparse_distill` /
``dense_distill``); nothing here imports Megatron or training-loop code.
"""
