"""Parsing and checking one ingest message: a frame (``validate_frame`` -> FrameRecord), a telemetry or
status message (``parse_device_message`` -> DeviceUpdate), the device-record fields a Status sets, and
the rejection reasons (``REASONS``; those whose payload is kept: ``DEAD_LETTER_REASONS``). Pure
functions of the payload: no store, no threads, no MQTT (the pipeline is hub/ingest/pipeline.py)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, Optional

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from hub.errors import ImageRejected, PayloadRejected
from hub.ingest import imagecheck
from hub.store.base import FrameRecord
from hub.store.series import SeriesPoint, point_from_telemetry
from proto import kestrel_pb2, topics

REASONS = ("too_large", "bad_topic", "bad_protobuf", "device_mismatch", "missing_frame_id", "bad_image",
           "unknown_device", "frame_id_conflict", "validation_error", "store_error")
# rejections whose payload is kept in the dead-letter folder (the payload itself may be fine)
DEAD_LETTER_REASONS = ("frame_id_conflict", "validation_error", "store_error")


_REASON_NAMES: Dict[int, str] = {v: k for k, v in kestrel_pb2.SampleReason.items()}


def validate_frame(topic_device: str, payload: bytes, max_bytes: int, received_ms: int,
                   image_check: str = "structure") -> FrameRecord:
    """Parse and check one frame message; PayloadRejected(reason, message) when it is bad."""
    if len(payload) > max_bytes:
        raise PayloadRejected("too_large", f"{len(payload)} bytes > max_payload_bytes {max_bytes}")
    msg = kestrel_pb2.Frame()
    try:
        msg.ParseFromString(payload)
    except (DecodeError, ValueError) as exc:
        raise PayloadRejected("bad_protobuf", f"not a kestrel.v1.Frame: {exc}") from exc
    if not msg.frame_id:
        raise PayloadRejected("missing_frame_id", "frame_id is empty")
    if msg.device_id != topic_device:
        raise PayloadRejected("device_mismatch",
                              f"device_id {msg.device_id!r} in the message, {topic_device!r} in the topic")
    if not msg.image:
        raise PayloadRejected("bad_image", "no image", frame_id=msg.frame_id)
    try:
        width, height = imagecheck.check_image(msg.image, msg.image_format, image_check)
    except ImageRejected as exc:
        raise PayloadRejected("bad_image", str(exc), frame_id=msg.frame_id) from exc
    return FrameRecord(
        frame_id=msg.frame_id, device_id=msg.device_id, capture_time_ms=int(msg.capture_time_ms),
        received_ms=received_ms, model_name=msg.model.name, model_version=int(msg.model.version),
        model_sha256=msg.model.sha256,
        reasons=[_REASON_NAMES.get(r) or str(r) for r in msg.reasons],
        top_k=[{"index": int(t.index), "label": t.label, "score": float(t.score)} for t in msg.top_k],
        image=bytes(msg.image), image_format=msg.image_format or "jpeg", width=width, height=height,
        source=msg.source, sequence=int(msg.sequence),
        image_sha256=hashlib.sha256(msg.image).hexdigest())  # here, on the validate pool, not at commit


def seen_ms(device_time_ms: int, received_ms: int) -> int:
    """When the hub last heard of a device: the message's own time, never later than its arrival (a
    device clock running ahead must not pin last_seen in the future)."""
    return min(int(device_time_ms or received_ms), int(received_ms))


def status_fields(msg: kestrel_pb2.Status) -> Dict[str, object]:
    """Device-record fields from a Status message (VersionManifest included). last_seen_ms is not
    among them: it only ever goes up (Store.touch_devices), since a device's offline last-will carries
    the time it connected."""
    out: Dict[str, object] = {"state": msg.state or "unknown"}
    if msg.group:
        out["group"] = msg.group
    installed = msg.versions.installed if msg.HasField("versions") and msg.versions.HasField("installed") \
        else msg.model
    if installed.name:
        out.update(reported_model=installed.name, reported_version=int(installed.version),
                   reported_sha256=installed.sha256)
    if msg.HasField("versions"):
        out.update(update_state=msg.versions.update_state, update_reason=msg.versions.reason,
                   previous_version=int(msg.versions.previous.version))
    # Only an online status says what runs now: an offline one may be the last will the device left with
    # the broker when it connected, before a model swap changed the threshold. Absent: an older device.
    if msg.HasField("confidence_threshold") and msg.state != topics.STATE_OFFLINE:
        out["threshold"] = round(float(msg.confidence_threshold), 6)  # float32 on the wire: 0.71, not 0.7099999
    return out


@dataclass
class DeviceUpdate:
    """A parsed telemetry or status message: the device-record fields it sets, and when it was heard."""
    kind: str                      # "telemetry" or "status"
    device_id: str
    fields: Dict[str, object]
    seen_ms: int
    point: Optional[SeriesPoint] = None  # telemetry: its point of the per-minute series (charts)


def parse_device_message(device_id: str, kind: str, payload: bytes, received_ms: int) -> Optional[DeviceUpdate]:
    """A telemetry or status message -> DeviceUpdate; None for a cleared retained status; PayloadRejected
    when it is bad."""
    if kind == "status" and not payload:
        return None
    msg: Any = kestrel_pb2.Telemetry() if kind == "telemetry" else kestrel_pb2.Status()
    try:
        msg.ParseFromString(payload)
    except (DecodeError, ValueError) as exc:
        raise PayloadRejected("bad_protobuf", f"not a kestrel.v1.{type(msg).__name__}: {exc}") from exc
    if msg.device_id and msg.device_id != device_id:
        raise PayloadRejected("device_mismatch", f"{kind} for {msg.device_id!r} on {device_id!r}'s topic")
    seen = seen_ms(msg.time_ms, received_ms)
    if kind == "status":
        return DeviceUpdate(kind, device_id, status_fields(msg), seen)
    tele = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return DeviceUpdate(kind, device_id, {"last_telemetry": tele}, seen, point_from_telemetry(device_id, tele, seen))
