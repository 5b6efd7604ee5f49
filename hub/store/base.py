"""The storage contract. Every backend passes tests/hub/test_store_contract.py.

Records are plain dataclasses; images are bytes. Every write is idempotent on its natural key
(frame_id, (model_name, version), device_id, group) so MQTT redeliveries and retried pushes are safe.
Backends raise hub.errors.StoreUnavailable when the database cannot be reached (the ingest then
pauses and retries without acknowledging) and hub.errors.StoreError for anything else.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import BinaryIO, Dict, Iterator, List, Optional, Sequence

from hub.store.authrecords import SessionRecord, TokenRecord
from hub.store.query import UNUSABLE_LABEL, FramePage, FrameQuery
from hub.store.series import SeriesPoint

__all__ = ["DESIRED_SCOPE_DEVICE", "DESIRED_SCOPE_GROUP", "DeviceRecord", "FramePage", "FrameQuery", "FrameRecord",
           "GroupDesired", "ModelRecord", "SeriesPoint", "SessionRecord", "Store", "TokenRecord", "UNUSABLE_LABEL"]


@dataclasses.dataclass
class FrameRecord:
    frame_id: str
    device_id: str
    capture_time_ms: int
    received_ms: int
    model_name: str
    model_version: int
    model_sha256: str
    reasons: List[str]
    top_k: List[Dict[str, object]]        # [{"index": 0, "label": "cat", "score": 0.41}, ...]
    image: bytes
    image_format: str
    width: int
    height: int
    source: str = ""
    sequence: int = 0
    label: Optional[str] = None           # set by a person (dashboard / API); exported for training
    labelled_ms: Optional[int] = None
    image_sha256: str = ""                # hex sha256 of image (the ingest computes it); the store fills it
                                          # in when empty ("" on an older hub's SQLite rows)
    labelled_by: str = ""                 # who set the label (a token name; "" = unknown / older hub)


@dataclasses.dataclass
class DeviceRecord:
    device_id: str
    group: str = "default"
    state: str = "unknown"                # online / offline / unknown
    last_seen_ms: int = 0
    reported_model: str = ""
    reported_version: int = 0
    reported_sha256: str = ""
    update_state: str = ""
    update_reason: str = ""
    previous_version: int = 0
    desired_model: str = ""
    desired_version: int = 0
    desired_scope: str = ""               # who set desired_*: "device" (pinned), "group", "" (never / older hub)
    last_telemetry: Dict[str, object] = dataclasses.field(default_factory=dict)
    threshold: float = 0.0                # the sampler's confidence threshold the device reported in force
                                          # (0.0: not reported, e.g. a device older than Status field 8)
    enrolled_group: str = ""              # the group its identity was issued for (the ACL's); never set by a message
    enrolled_ms: int = 0                  # `kestrel-hub devices add` (0 = never enrolled)
    revoked_ms: int = 0                   # `kestrel-hub devices revoke` (0 = not revoked)
    overrides_group: bool = False         # listing only (hub.fleet.effective_desired): its own desired state hides
                                          # a desired state of its group


DESIRED_SCOPE_DEVICE = "device"
DESIRED_SCOPE_GROUP = "group"


@dataclasses.dataclass
class GroupDesired:
    """The last deploy/rollback addressed to a group (what its retained desired topic says)."""
    group: str
    model_name: str
    version: int
    rollback: bool
    issued_ms: int


@dataclasses.dataclass
class ModelRecord:
    model_name: str
    version: int
    bundle_sha256: str
    size: int
    created_ms: int
    model_sha256: str = ""
    key_id: str = ""
    metrics: Dict[str, object] = dataclasses.field(default_factory=dict)
    labels: List[str] = dataclasses.field(default_factory=list)  # the model's class names (manifest order)


class Store(abc.ABC):
    # ---- frames ----
    @abc.abstractmethod
    def add_frame(self, frame: FrameRecord) -> bool:
        """Store a frame; False (and no change) when frame_id exists already."""

    def add_frames(self, frames: List[FrameRecord]) -> List[Optional[str]]:
        """Store several frames, committed together where the backend can.

        Returns, per frame, None when it was stored now, or the device_id its frame_id is already
        stored for (nothing changed): the caller tells a redelivery (the same device) from an id
        another device owns without a second read. Either all of them are durable when this returns,
        or it raises (StoreUnavailable / StoreError) and the caller retries the whole batch.
        """
        return self.apply_batch(frames, {}, {})

    def apply_batch(self, frames: List[FrameRecord], devices: Dict[str, Dict[str, object]],
                    seen: Dict[str, int], points: Sequence[SeriesPoint] = ()) -> List[Optional[str]]:
        """The ingest's writes of one batch: ``devices`` upserted (device_id -> fields, as
        upsert_device), ``frames`` added (results as add_frames), last_seen_ms raised to ``seen``
        (as touch_devices), and ``points`` of the telemetry series upserted (hub.store.series, as
        add_series). SQLite commits all of it in one
        transaction (one fsync); MongoDB in one bulk write per collection (every part is idempotent,
        so a retry after a partial write is safe). Durable when it returns, else it raises and the
        caller retries the whole batch."""
        for device_id, fields in devices.items():
            self.upsert_device(device_id, **fields)
        self.add_series(points)
        out: List[Optional[str]] = []
        for f in frames:
            if self.add_frame(f):
                out.append(None)
            else:
                existing = self.get_frame(f.frame_id)
                out.append(existing.device_id if existing is not None else f.device_id)
        if seen:
            self.touch_devices(seen)
        return out

    def stage_frames(self, frames: List[FrameRecord]) -> None:
        """Optional: durably write ahead what a later apply_batch of these very records will need, so
        that commit has less to do (SQLite: the images, into segment files). The ingest calls it off its
        commit thread and ignores failures (apply_batch then writes the images itself). Default: no-op."""
        return None

    @abc.abstractmethod
    def get_frame(self, frame_id: str) -> Optional[FrameRecord]: ...

    @abc.abstractmethod
    def list_frames(self, device_id: Optional[str] = None, label: Optional[str] = None,
                    unlabelled: bool = False, since_ms: Optional[int] = None, limit: int = 100,
                    offset: int = 0, with_images: bool = False) -> List[FrameRecord]:
        """Newest first."""

    @abc.abstractmethod
    def count_frames(self, device_id: Optional[str] = None) -> int: ...

    def set_label(self, frame_id: str, label: Optional[str], when_ms: int, by: str = "") -> bool:
        """False when the frame does not exist."""
        return frame_id in self.set_labels({frame_id: label}, when_ms, by)

    @abc.abstractmethod
    def set_labels(self, labels: Dict[str, Optional[str]], when_ms: int, by: str = "") -> Dict[str, Optional[str]]:
        """Set (None: clear) the label of each named frame, recording who and when (cleared: neither).
        Returns the label each frame had before, for the frames that exist (unknown ids are left out).
        SQLite: one transaction; MongoDB: one bulk write (idempotent, safe to retry)."""

    @abc.abstractmethod
    def query_frames(self, query: FrameQuery) -> FramePage:
        """One page of frames (without images) matching ``query``, in its order (hub/store/query.py)."""

    @abc.abstractmethod
    def count_unlabelled(self) -> int:
        """Frames waiting for a label (label state "unlabelled")."""

    @abc.abstractmethod
    def iter_labelled(self) -> Iterator[FrameRecord]:
        """Every labelled frame with its image, oldest first (for export)."""

    # ---- devices ----
    @abc.abstractmethod
    def upsert_device(self, device_id: str, **fields: object) -> DeviceRecord:
        """Create or update the named fields; returns the record after the change."""

    def touch_devices(self, seen: Dict[str, int]) -> None:
        """Raise each named device's last_seen_ms to the given value; never lower it (a device's
        offline last-will carries the time it connected). Unknown devices are skipped. Backends
        override this to do it in one round trip / transaction."""
        for device_id, ms in seen.items():
            dev = self.get_device(device_id)
            if dev is not None and int(ms) > dev.last_seen_ms:
                self.upsert_device(device_id, last_seen_ms=int(ms))

    @abc.abstractmethod
    def get_device(self, device_id: str) -> Optional[DeviceRecord]: ...

    @abc.abstractmethod
    def list_devices(self, group: Optional[str] = None) -> List[DeviceRecord]: ...

    # ---- groups ----
    @abc.abstractmethod
    def set_group_desired(self, group: str, model_name: str, version: int, rollback: bool,
                          issued_ms: int) -> GroupDesired:
        """Create or replace the group's desired state; returns the stored record."""

    @abc.abstractmethod
    def get_group_desired(self, group: str) -> Optional[GroupDesired]:
        """None when no deploy/rollback has named the group."""

    # ---- bundle blobs: the registry's signed bundles by sha256 (hub/store/blobs.py; hub.registry) ----
    @abc.abstractmethod
    def put_blob(self, sha256: str, src: BinaryIO, size: int) -> None:
        """Keep the ``size`` bytes read from ``src`` as blob ``sha256`` (the hex sha256 of those bytes), durably
        when it returns. A blob kept already is not written again. StoreError (nothing kept) when the bytes
        are not ``size`` bytes hashing to ``sha256``."""

    @abc.abstractmethod
    def open_blob(self, sha256: str) -> BinaryIO:
        """A seekable reader of the blob (the caller closes it); BundleBytesMissing when there is none."""

    @abc.abstractmethod
    def has_blob(self, sha256: str) -> bool: ...

    @abc.abstractmethod
    def delete_blob(self, sha256: str) -> bool:
        """False when there was none."""

    # ---- models (records; their bundles are blobs named by bundle_sha256) ----
    @abc.abstractmethod
    def add_model(self, model: ModelRecord) -> bool:
        """False when (model_name, version) exists already."""

    @abc.abstractmethod
    def get_model(self, model_name: str, version: int) -> Optional[ModelRecord]: ...

    @abc.abstractmethod
    def list_models(self, model_name: Optional[str] = None) -> List[ModelRecord]:
        """Highest version first."""

    # ---- telemetry series (hub/store/series.py) ----
    @abc.abstractmethod
    def add_series(self, points: Sequence[SeriesPoint]) -> None:
        """Upsert points on (device_id, minute_ms); a point never replaces one with a later time_ms."""

    @abc.abstractmethod
    def list_series(self, since_ms: int, until_ms: Optional[int] = None,
                    device_ids: Optional[List[str]] = None) -> List[SeriesPoint]:
        """Points with since_ms <= minute_ms < until_ms, ordered by device_id then minute_ms."""

    @abc.abstractmethod
    def prune_series(self, before_ms: int) -> int:
        """Delete the points of minutes before ``before_ms``; how many were deleted."""

    # ---- API tokens and browser sessions (hub/store/authrecords.py) ----
    @abc.abstractmethod
    def add_token(self, token: TokenRecord) -> bool:
        """False (nothing changed) when an active token has this name; a revoked one is replaced."""

    @abc.abstractmethod
    def get_token(self, name: str) -> Optional[TokenRecord]: ...

    @abc.abstractmethod
    def find_token(self, token_hash: str) -> Optional[TokenRecord]:
        """The token whose hash this is (active or revoked), or None."""

    @abc.abstractmethod
    def list_tokens(self) -> List[TokenRecord]:
        """Every token, by name."""

    @abc.abstractmethod
    def revoke_token(self, name: str, when_ms: int) -> bool:
        """False when no active token has this name."""

    @abc.abstractmethod
    def add_session(self, session: SessionRecord) -> None: ...

    @abc.abstractmethod
    def get_session(self, id_hash: str) -> Optional[SessionRecord]:
        """The session (expired ones too: the caller checks expires_ms), or None."""

    @abc.abstractmethod
    def delete_session(self, id_hash: str) -> None: ...

    @abc.abstractmethod
    def prune_sessions(self, now_ms: int) -> int:
        """Delete the sessions that expired before ``now_ms``; how many."""

    # ---- lifecycle ----
    def health(self) -> Dict[str, object]:
        """Backend figures for /healthz (SQLite: its checkpoints and image writes). Default: none."""
        return {}

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable when the backend cannot be reached."""

    @abc.abstractmethod
    def close(self) -> None: ...
