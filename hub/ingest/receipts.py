"""Storage receipts: after a batch committed, one ``Receipt`` per device naming its frames that are now
durable in the store (docs/adr/0019-storage-receipts.md).

A frame counts as durable when the batch stored it or found it stored already (a redelivery, or a device
resending for want of a receipt): either way the store holds it. A frame the hub refused for good is
named in ``refused`` with the reason, so the device sets it aside instead of resending it: those the
store refused or whose id another device owns (both kept in the dead-letter folder), a bad image, an
unknown device. Frames whose id could not be read (not a Frame, too large, no frame_id) or that claim
another device than their topic cannot be named; the device's own rule (edge.uplink.receipts) sets such
a frame aside after it kept coming due while its other frames were receipted.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from hub.errors import PayloadRejected
from hub.ingest.message import Message
from hub.store.base import FrameRecord
from proto import kestrel_pb2, topics

DURABLE = ("stored", "duplicate")  # BatchState outcomes that mean "the store holds this frame"
NOT_NAMED = ("device_mismatch",)   # rejections whose frame is not the topic's device's to hear about


def build(batch: Sequence[Message], validated: Sequence[object], frames: Sequence[Tuple[int, FrameRecord]],
          outcomes: Dict[int, str], rejected: Sequence[Tuple[int, PayloadRejected]], hub_id: str,
          committed_ms: int) -> List[kestrel_pb2.Receipt]:
    """The receipts of one committed batch, one per device that has something in it."""
    out: Dict[str, kestrel_pb2.Receipt] = {}

    def receipt(device_id: str) -> kestrel_pb2.Receipt:
        r = out.get(device_id)
        if r is None:
            r = out[device_id] = kestrel_pb2.Receipt(device_id=device_id, committed_ms=committed_ms, hub_id=hub_id)
        return r

    for i, rec in frames:
        if outcomes.get(i) in DURABLE:
            receipt(rec.device_id).frame_ids.append(rec.frame_id)
    for i, why in rejected:
        if why.reason in NOT_NAMED:
            continue
        v = validated[i]
        frame_id = why.frame_id or (v.frame_id if isinstance(v, FrameRecord) else "")
        try:
            device_id, kind = topics.parse_device_topic(batch[i].topic)
        except ValueError:
            continue
        if frame_id and kind == "frames":
            receipt(device_id).refused.add(frame_id=frame_id, reason=why.reason)
    return list(out.values())
