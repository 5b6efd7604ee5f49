"""Every error the edge daemon raises, on the two roots of proto.errors (ArtifactError: bad input,
retrying will not help, exit 2; TransportError: something unavailable, retry later, exit 3). The
contract errors it also raises (ConfigError, BundleError, KeyFileError, HubError) are in proto.errors.

One signal is not an error and never leaves edge/: EndOfStream, a live source's normal end.
"""

from __future__ import annotations

from proto.errors import ArtifactError, TransportError

# -- bad input (ArtifactError) ----------------------------------------------------------------------

class ModelError(ArtifactError):
    """A model cannot be loaded or does not fit the source/contract."""


class FrameError(ArtifactError):
    """A frame is corrupt or cannot be encoded/decoded."""


class OversizeFrame(FrameError):
    """A sampled frame encodes to more than [mqtt] max_payload_bytes even after re-encoding smaller."""


class RuntimeUnavailable(ModelError):
    """No usable TFLite runtime is installed."""


class SlotError(ArtifactError):
    """A model slot is missing or its files do not match its record."""


class SelfTestError(ArtifactError):
    """The staged model failed its self-test; the running model is untouched."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.reason = "self_test"


class NothingToDo(ArtifactError):
    """The offered bundle's version is the one installed: nothing changes. The update paths catch it
    before any other refusal; `kestrel-edge install` reports it and exits 0."""


class NoRollbackTarget(ArtifactError):
    """There is no committed, trusted previous model to roll back to; nothing was changed."""


class UpdateBusy(ArtifactError):
    """Another update is in progress or on trial; nothing was changed."""


# -- something unavailable (TransportError) ---------------------------------------------------------

class SourceError(TransportError):
    """A camera source cannot be opened or stopped delivering frames."""


class BrokerError(TransportError):
    """The MQTT broker is unreachable or refused the connection."""


class AuthError(BrokerError):
    """The broker refused our credentials; retrying quickly will not help."""


class StorageError(TransportError):
    """Local storage (the spool, a state file) cannot be written: disk full, read-only, I/O error.
    Retrying later may help (space freed, disk remounted)."""


class FetchError(TransportError):
    """A downloaded bundle could not be written locally (disk full, permissions); retrying later may help."""


# -- signals (not errors) ----------------------------------------------------------------------------

class EndOfStream(Exception):
    """A live source reached a normal end (a GStreamer pipeline's EOS): the source ends, no retry."""
