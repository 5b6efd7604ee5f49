"""The fleet as the dashboard and ``GET /api/devices`` show it: one row per device, desired next to
reported, the update state and why, and the figures of its last telemetry."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from hub.fleet import devices_with_desired
from hub.store.base import DeviceRecord, Store


def _num(tele: Mapping[str, Any], key: str) -> Optional[float]:
    """A telemetry figure (protobuf's JSON form leaves zeros out and writes 64-bit integers as strings)."""
    if not tele:
        return None
    try:
        return float(tele.get(key, 0) or 0)
    except (TypeError, ValueError):
        return None


def devices(store: Store, group: Optional[str] = None) -> List[DeviceRecord]:
    """Device records with the desired state that applies to each (hub.fleet.devices_with_desired)."""
    return devices_with_desired(store, group)


def device_json(d: DeviceRecord) -> Dict[str, Any]:
    tele: Mapping[str, Any] = d.last_telemetry or {}
    threshold = getattr(d, "threshold", None)  # the confidence threshold in force (issue 15); 0 = unknown
    desired = (d.desired_model, int(d.desired_version))
    reported = (d.reported_model, int(d.reported_version))
    return {
        "device_id": d.device_id, "group": d.group, "state": d.state, "last_seen_ms": d.last_seen_ms,
        "desired_model": d.desired_model, "desired_version": d.desired_version, "desired_scope": d.desired_scope,
        "overrides_group": bool(d.overrides_group),  # its own desired state hides its group's (issue 11)
        "enrolled_group": d.enrolled_group, "enrolled_ms": d.enrolled_ms, "revoked_ms": d.revoked_ms,
        "reported_model": d.reported_model, "reported_version": d.reported_version,
        "reported_sha256": d.reported_sha256, "previous_version": d.previous_version,
        "update_state": d.update_state, "update_reason": d.update_reason,
        "in_sync": bool(d.desired_version) and desired == reported,
        "threshold": float(threshold) if threshold else None,
        "fps": _num(tele, "fps"), "latency_p50_ms": _num(tele, "latency_p50_ms"),
        "latency_p95_ms": _num(tele, "latency_p95_ms"), "spool_frames": _num(tele, "spool_frames"),
        "dead_letters": _num(tele, "dead_letters"), "frames_processed": _num(tele, "frames_processed"),
        "telemetry_ms": int(_num(tele, "time_ms") or 0),
    }


def summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Counts for the fleet page's header."""
    return {"devices": len(rows), "online": sum(r["state"] == "online" for r in rows),
            "offline": sum(r["state"] == "offline" for r in rows),
            "updating": sum(r["update_state"] in ("DOWNLOADING", "VERIFIED", "STAGED", "SELF_TEST", "TRIAL",
                                                  "ROLLING_BACK") for r in rows),
            "trouble": sum(r["update_state"] in ("ROLLED_BACK", "FAILED") for r in rows),
            "groups": sorted({r["group"] for r in rows})}
