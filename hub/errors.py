"""Every error the hub raises. Roots follow proto.errors: ArtifactError (bad input: a payload, a
bundle, a config) and TransportError (something unreachable: the store, the broker). Third-party
errors (pymongo, sqlite3, paho, grpc) are wrapped at the boundary with ``raise ... from exc``."""

from __future__ import annotations

from proto.errors import ArtifactError, ConfigError, KestrelError, TransportError

__all__ = [
    "ArtifactError", "ConfigError", "KestrelError", "TransportError",
    "PayloadRejected", "StoreError", "StoreUnavailable", "RegistryError", "NotFound", "SecurityError",
]


class PayloadRejected(ArtifactError):
    """An MQTT payload failed validation; ``reason`` is the counter key (too_large, bad_protobuf, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class StoreError(TransportError):
    """The store failed an operation (refused a write, a corrupt record, a broken database...).

    A TransportError: the problem is on the server side, not in what the caller sent, so the CLI
    exits 3 and gRPC answers UNAVAILABLE. The ingest pauses and retries on it (it only drops a
    frame, to the dead-letter folder, when the failure is clearly about that one record)."""


class StoreUnavailable(StoreError):
    """The store cannot be reached; the ingest pauses and retries without acknowledging."""


class RegistryError(ArtifactError):
    """A pushed bundle was refused (bad signature, wrong hash, cut off, duplicate version...)."""


class NotFound(ArtifactError):
    """The named model version, device or frame does not exist."""


class SecurityError(ArtifactError):
    """The fleet's security material is missing, unusable or unsafe (CA, fleet key, identity files), or
    an enrolment request is invalid (bad device name, a device enrolled already)."""
