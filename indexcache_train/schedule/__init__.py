"""The IndexCache schedule: which layers are Full (own indexer) and which are Shared.

``core`` holds the roles, sources and share groups; ``hf_keys`` reads and writes the HF /
vLLM / SGLang config keys. Pure Python (no torch, no Megatron).
"""

from indexcache_train.schedule.core import (
    FULL,
    SHARED,
    IndexCacheSchedule,
    ScheduleError,
    ShareGroup,
    rule_is_full,
)

__all__ = ["FULL", "SHARED", "IndexCacheSchedule", "ScheduleError", "ShareGroup", "rule_is_full"]
