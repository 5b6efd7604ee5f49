"""The image tools' errors, in the two-rooted tree of proto.errors (exit 2 bad input, exit 3 unreachable)."""

from __future__ import annotations

from proto.errors import ArtifactError, TransportError


class ImageInputError(ArtifactError):
    """A wrong L4T folder, an unknown board, a missing or malformed device identity, a bad file given."""


class ToolFailed(TransportError):
    """An outside tool failed: NVIDIA's scripts (no Jetson in recovery mode, ...) or pip (no registry).
    Its own output above says why; fix that and run again."""
