"""indexcache-train: a Megatron-Core trainer for DSA models with IndexCache."""

__version__ = "0.1.0"
