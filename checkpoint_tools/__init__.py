"""HF checkpoint tools for DSA / IndexCache models: ``python -m checkpoint_tools <verb>``."""
