"""Every error the hub defines, in the two-rooted tree of proto.errors:

* ArtifactError (bad input, retrying the same will not help; a CLI exits 2): a payload or image from a
  device (PayloadRejected, ImageRejected), a pushed bundle (RegistryError, PushRefused), a config
  (ConfigError; DataDirBusy: another hub holds the data folder), a request naming what does not exist
  (NotFound), a fleet request (FleetRequestError, NothingToRollBack), a label (LabelError), an export
  (ExportError), a frame query of the dashboard (QueryError), a token request (AuthError), an HTTP
  request the dashboard or its API refuses (WebError, LoginRequired: a 4xx status and one line), an API
  call the CLI made (ApiRefused), the fleet's security material or an enrolment request (SecurityError);
* TransportError (something on our side is unreachable or failing, retrying later may help; a CLI
  exits 3, gRPC answers UNAVAILABLE): the store (StoreError, StoreUnavailable, BundleBytesMissing).

Third-party errors (pymongo, sqlite3, paho, grpc, OpenCV) are wrapped at the boundary with
``raise ... from exc``. The modules that raise these errors import them from here and re-export the
names they always had (``from hub.registry import PushRefused`` etc. keep working).
"""

from __future__ import annotations

from proto.errors import ArtifactError, ConfigError, KestrelError, TransportError

__all__ = [
    "ArtifactError", "ConfigError", "KestrelError", "TransportError",
    "DataDirBusy", "PayloadRejected", "ImageRejected", "RegistryError", "PushRefused", "NotFound",
    "FleetRequestError", "NothingToRollBack", "LabelError", "ExportError", "QueryError", "AuthError", "WebError",
    "LoginRequired", "ApiRefused", "SecurityError",
    "StoreError", "StoreUnavailable", "BundleBytesMissing",
    "INVALID", "PRECONDITION", "EXISTS",
]

# How a refusal maps onto gRPC status codes (hub.grpc_service): PushRefused.kind, NothingToRollBack.kind.
INVALID = "invalid_argument"          # the bytes are bad: tampered, cut off, wrong hash, too large
PRECONDITION = "failed_precondition"  # the bundle is fine but not acceptable here: untrusted key, old version
EXISTS = "already_exists"             # that version exists with different content


# ---- bad input (ArtifactError) ----

class DataDirBusy(ConfigError):
    """Another hub process holds the data folder's lock (hub.datadir); the message names its PID."""


class PayloadRejected(ArtifactError):
    """An MQTT payload failed validation; ``reason`` is the counter key (too_large, bad_protobuf, ...).
    ``frame_id``: the rejected frame's id when it was read (its device gets a receipt saying so)."""

    def __init__(self, reason: str, message: str, frame_id: str = "") -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.frame_id = frame_id


class ImageRejected(ArtifactError):
    """A frame's image is not a well-formed JPEG/PNG (hub.ingest.imagecheck); the message says why.
    The ingest counts it as PayloadRejected("bad_image")."""


class RegistryError(ArtifactError):
    """A pushed bundle was refused (bad signature, wrong hash, cut off, duplicate version...)."""


class PushRefused(RegistryError):
    """A push was refused; ``reason`` is a short code, ``kind`` one of INVALID/PRECONDITION/EXISTS."""

    def __init__(self, reason: str, message: str, kind: str = INVALID) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.kind = kind


class NotFound(ArtifactError):
    """The named model version, device or frame does not exist."""


class FleetRequestError(ArtifactError):
    """A deploy/rollback request is malformed (both or neither of device and group, bad id...)."""


class NothingToRollBack(FleetRequestError):
    """A rollback the hub cannot name a version for (devices act only on the version they run):
    refused instead of announcing a message every device would ignore."""

    kind = PRECONDITION  # the request is fine, the fleet state is not


class LabelError(ArtifactError):
    """A label name is not acceptable (hub.labels)."""


class ExportError(ArtifactError):
    """The export cannot be written as asked (target exists, unsafe label, nothing to export...)."""


class QueryError(ArtifactError):
    """A frame query is malformed (unknown order or state, bad cursor, limit out of range...; hub.store.query)."""


class AuthError(ArtifactError):
    """A token request is malformed (unknown role, bad name, name taken...; hub.auth)."""


class WebError(ArtifactError):
    """An HTTP request refused with ``status`` (4xx) and a one-line ``detail`` (hub.web)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class LoginRequired(WebError):
    """No token and no session (401): pages redirect to the login page, the API answers 401."""

    def __init__(self, detail: str = "log in first: send Authorization: Bearer <token> or log in at /login") -> None:
        super().__init__(401, detail)


class ApiRefused(ArtifactError):
    """The hub's HTTP API refused a CLI's request (bad input, no or the wrong token; hub.cli.apiclient)."""


class SecurityError(ArtifactError):
    """The fleet's security material is missing, unusable or unsafe (CA, fleet key, identity files), or
    an enrolment request is invalid (bad device name, a device enrolled already)."""


# ---- something on our side failing (TransportError) ----

class StoreError(TransportError):
    """The store failed an operation (refused a write, a corrupt record, a broken database...).

    A TransportError: the problem is on the server side, not in what the caller sent, so the CLI
    exits 3 and gRPC answers UNAVAILABLE. The ingest pauses and retries on it (it only drops a
    frame, to the dead-letter folder, when the failure is clearly about that one record)."""


class StoreUnavailable(StoreError):
    """The store cannot be reached; the ingest pauses and retries without acknowledging."""


class BundleBytesMissing(StoreError):
    """A version's record exists but this hub cannot read its bytes (gRPC UNAVAILABLE: retry elsewhere)."""
