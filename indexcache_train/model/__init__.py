"""Model code: Megatron-Core layer specs for DSA models with IndexCache.

Model code is single-device in spirit: it reads no parallel globals (process groups come in through
Megatron's ``pg_collection``) and imports no training code (a layering test enforces it).
"""
