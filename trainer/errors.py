"""Trainer errors: all under proto.errors so the CLI prints one clear line and exits non-zero."""

from __future__ import annotations

from proto.errors import ArtifactError, HubError


class DataError(ArtifactError):
    """The training data cannot be used (empty, one class, too few images per class ...)."""


class WeightsError(ArtifactError):
    """A weights file does not fit the chosen architecture."""


class GateError(ArtifactError):
    """The int8 model is too much worse than the float model: packaging refused."""


class RunDirError(ArtifactError):
    """A run directory is missing a stage's output, or an output is stale (run the earlier stage first)."""


class OptimizeError(ArtifactError):
    """Pruning, QAT or TFLite conversion cannot handle this model."""


__all__ = ["DataError", "WeightsError", "GateError", "RunDirError", "OptimizeError", "HubError"]
