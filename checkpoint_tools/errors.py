"""Checkpoint-tool errors: every message names the file, the tensor (where there is one) and the fix.

One class per failure kind, so callers and tests can tell them apart, all under
:class:`CheckpointError` so the CLI reports any of them in one place. Validation collects
:class:`CheckpointIssue` records first (so one run lists every problem, not just the first) and
then raises the error class of the first issue with all of them in the message.
"""

from __future__ import annotations

from dataclasses import dataclass

#: How many issues one exception message lists before "... and N more".
MAX_ISSUES_IN_MESSAGE = 20


class CheckpointError(Exception):
    """Base class; ``str(err)`` is the complete, user-facing message."""

    kind = "checkpoint"

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        tensor: str | None = None,
        fix: str | None = None,
        issues: tuple[CheckpointIssue, ...] = (),
    ) -> None:
        self.file = file
        self.tensor = tensor
        self.fix = fix
        self.issues = issues
        super().__init__(_format(message, file, tensor, fix))


class MissingTensorError(CheckpointError):
    """A tensor the config and schedule require is absent."""

    kind = "missing_tensor"


class UnexpectedTensorError(CheckpointError):
    """A tensor the config and schedule do not explain (e.g. an indexer on a Shared layer)."""

    kind = "unexpected_tensor"


class Fp8ScaleMissingError(CheckpointError):
    """An FP8 weight without its ``weight_scale_inv`` (or a scale of the wrong shape)."""

    kind = "fp8_scale"


class ShapeMismatchError(CheckpointError):
    """A tensor's shape disagrees with the one the config implies."""

    kind = "shape"


class DtypeMismatchError(CheckpointError):
    """A tensor's dtype disagrees with the config (or with a dtype the format requires)."""

    kind = "dtype"


class ConfigError(CheckpointError):
    """config.json is missing, unreadable, or lacks a key the tools need."""

    kind = "config"


class ConfigScheduleMismatchError(ConfigError):
    """The config's schedule keys contradict each other, the layer count, or the request."""

    kind = "config_schedule"


class CorruptShardError(CheckpointError):
    """A shard is truncated, its header is unreadable, or the index points at a missing shard."""

    kind = "corrupt_shard"


class OutputExistsError(CheckpointError):
    """The output directory exists and ``overwrite`` was not requested."""

    kind = "output_exists"


class UnsupportedConversionError(CheckpointError):
    """The request is valid input but a conversion this tool deliberately does not perform."""

    kind = "unsupported"


class ParallelLayoutError(CheckpointError):
    """The launch does not fit the requested TP / PP / EP layout (e.g. the world size)."""

    kind = "parallel_layout"


@dataclass(frozen=True)
class CheckpointIssue:
    """One validation finding; ``error`` is the class :meth:`raise_issues` raises for it."""

    error: type[CheckpointError]
    message: str
    file: str | None = None
    tensor: str | None = None
    fix: str | None = None

    def __str__(self) -> str:
        return _format(self.message, self.file, self.tensor, self.fix)


def raise_issues(issues: list[CheckpointIssue] | tuple[CheckpointIssue, ...], header: str) -> None:
    """Raise the first issue's error class with every issue listed; no-op when there are none."""
    if not issues:
        return
    first = issues[0]
    lines = [f"  - {issue}" for issue in issues[:MAX_ISSUES_IN_MESSAGE]]
    if len(issues) > MAX_ISSUES_IN_MESSAGE:
        lines.append(f"  ... and {len(issues) - MAX_ISSUES_IN_MESSAGE} more")
    message = f"{header}: {len(issues)} problem(s)\n" + "\n".join(lines)
    err = first.error(message, issues=tuple(issues))
    # The message already names every file and tensor; keep the first one's for programmatic use.
    err.file, err.tensor, err.fix = first.file, first.tensor, first.fix
    raise err


def _format(message: str, file: str | None, tensor: str | None, fix: str | None) -> str:
    where = ", ".join(
        part for part in (file and f"file {file}", tensor and f"tensor {tensor}") if part
    )
    text = f"{message} [{where}]" if where else message
    return f"{text}. Fix: {fix}" if fix else text
