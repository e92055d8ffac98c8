"""Indexer distillation losses (pure torch; no Megatron, no training-loop imports)."""
