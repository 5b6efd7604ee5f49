"""MQTT topic layout, version 1 (docs/contracts.md). One definition used by edge, hub and tests."""

from __future__ import annotations

PREFIX = "kestrel/v1"

QOS_FRAMES = 1
QOS_TELEMETRY = 0
QOS_STATUS = 1
QOS_DESIRED = 1
QOS_RECEIPTS = 1     # hub -> device, not retained (docs/adr/0019-storage-receipts.md)
QOS_HUB = 1          # the hub's announcement (retained) and resend requests (not retained)

STATE_ONLINE = "online"
STATE_OFFLINE = "offline"


def check_segment(value: str, what: str) -> str:
    """``value`` if it is one valid topic segment; ValueError saying what is wrong otherwise."""
    if not value or any(c in value for c in "/+#\x00") or value.startswith("$"):
        raise ValueError(f"invalid {what} {value!r}: must be non-empty, without '/', '+', '#' or a leading '$'")
    return value


def device_topic(device_id: str, kind: str) -> str:
    return f"{PREFIX}/devices/{check_segment(device_id, 'device id')}/{kind}"


def frames(device_id: str) -> str:
    return device_topic(device_id, "frames")


def telemetry(device_id: str) -> str:
    return device_topic(device_id, "telemetry")


def status(device_id: str) -> str:
    return device_topic(device_id, "status")


def device_desired(device_id: str) -> str:
    return device_topic(device_id, "desired")


def receipts(device_id: str) -> str:
    """Where the hub tells a device which of its frames are durable in the store (Receipt). Only hubs
    publish here; a device reads only its own."""
    return device_topic(device_id, "receipts")


def group_desired(group: str) -> str:
    return f"{PREFIX}/groups/{check_segment(group, 'group')}/desired"


# The hubs' own topics: only hubs publish there, every device reads them.
HUB_ANNOUNCE = f"{PREFIX}/hub/announce"  # HubAnnouncement, retained: "the hubs here send receipts"
HUB_RESEND = f"{PREFIX}/hub/resend"      # ResendRequest: "resend what you still wait a receipt for"

# Wildcards the hub subscribes to.
ALL_FRAMES = f"{PREFIX}/devices/+/frames"
ALL_TELEMETRY = f"{PREFIX}/devices/+/telemetry"
ALL_STATUS = f"{PREFIX}/devices/+/status"


def shared(group: str, topic: str) -> str:
    """An MQTT 5 / Mosquitto shared subscription: hub workers in one group split the messages."""
    return f"$share/{check_segment(group, 'share group')}/{topic}"


def parse_device_topic(topic: str) -> tuple[str, str]:
    """Return (device_id, kind) for ``kestrel/v1/devices/{id}/{kind}``; ValueError otherwise."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != f"{PREFIX}/devices" or not parts[3]:
        raise ValueError(f"not a Kestrel device topic: {topic!r}")
    return parts[3], parts[4]
