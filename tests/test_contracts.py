"""Wire contracts: topics and protobuf round trips (runs on the device Python too)."""

from __future__ import annotations

import pytest

from proto import kestrel_pb2 as pb
from proto import topics


def test_topic_layout() -> None:
    assert topics.frames("cam-1") == "kestrel/v1/devices/cam-1/frames"
    assert topics.status("cam-1") == "kestrel/v1/devices/cam-1/status"
    assert topics.group_desired("lobby") == "kestrel/v1/groups/lobby/desired"
    assert topics.shared("hub", topics.ALL_FRAMES) == "$share/hub/kestrel/v1/devices/+/frames"
    assert topics.parse_device_topic("kestrel/v1/devices/cam-1/frames") == ("cam-1", "frames")
    assert topics.receipts("cam-1") == "kestrel/v1/devices/cam-1/receipts"
    assert (topics.HUB_ANNOUNCE, topics.HUB_RESEND) == ("kestrel/v1/hub/announce", "kestrel/v1/hub/resend")
    assert topics.QOS_RECEIPTS == topics.QOS_HUB == 1


def test_receipt_round_trip() -> None:
    r = pb.Receipt(device_id="d", frame_ids=["d-b-1", "d-b-2"], committed_ms=5, hub_id="h",
                   refused=[pb.RefusedFrame(frame_id="d-b-3", reason="bad_image")])
    assert pb.Receipt.FromString(r.SerializeToString()) == r
    t = pb.Telemetry(frames_receipted=2, frames_resent=1, oldest_unreceipted_age_s=1.5, frames_awaiting_receipt=3)
    assert pb.Telemetry.FromString(t.SerializeToString()) == t


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "$SYS"])
def test_topic_segments_are_checked(bad: str) -> None:
    with pytest.raises(ValueError):
        topics.frames(bad)


@pytest.mark.parametrize("topic", ["kestrel/v1/devices//frames", "kestrel/v2/devices/a/frames", "x/y"])
def test_parse_rejects_foreign_topics(topic: str) -> None:
    with pytest.raises(ValueError):
        topics.parse_device_topic(topic)


def test_frame_round_trip() -> None:
    f = pb.Frame(frame_id="d-b-1", device_id="d", capture_time_ms=1, image=b"\xff\xd8", image_format="jpeg",
                 reasons=[pb.LOW_CONFIDENCE, pb.LOW_MARGIN],
                 top_k=[pb.TopScore(index=2, label="mid", score=0.4)],
                 model=pb.ModelRef(name="m", version=3, sha256="ab"))
    g = pb.Frame.FromString(f.SerializeToString())
    assert g == f and list(g.reasons) == [pb.LOW_CONFIDENCE, pb.LOW_MARGIN]
