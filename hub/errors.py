"""Every error the hub raises. Roots follow edge.errors: ArtifactError (bad input: a payload, a
bundle, a config) and TransportError (something unreachable: the store, the broker). Third-party
errors (pymongo, sqlite3, paho, grpc) are wrapped at the boundary with ``raise ... from exc``."""

from __future__ import annotations

from edge.errors import ArtifactError, ConfigError, KestrelError, TransportError

__all__ = [
    "ArtifactError", "ConfigError", "KestrelError", "TransportError",
    "PayloadRejected", "StoreError", "StoreUnavailable", "RegistryError", "NotFound",
]


class PayloadRejected(ArtifactError):
    """An MQTT payload failed validation; ``reason`` is the counter key (too_large, bad_protobuf, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class StoreError(KestrelError):
    """The store refused an operation for a reason other than being unreachable."""


class StoreUnavailable(TransportError):
    """The store cannot be reached; the ingest pauses and retries without acknowledging."""


class RegistryError(ArtifactError):
    """A pushed bundle was refused (bad signature, wrong hash, cut off, duplicate version...)."""


class NotFound(ArtifactError):
    """The named model version, device or frame does not exist."""
