"""The sink thread: sampled frames -> JPEG Frame messages -> the spool, bounded, nothing lost on close."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

from edge.config import EdgeConfig
from edge.pipeline.loop import SampledFrame
from edge.uplink.publisher import Publisher
from edge.uplink.sink import FrameBuilder, SinkWorker, downscale
from proto import kestrel_pb2 as pb
from tests.edge.conftest import publisher_for
from tests.helpers.wait import wait_for

LABELS = ["bright", "dark", "mid"]


def sampled(seq: int, h: int = 120, w: int = 160, seed: int = 0) -> SampledFrame:
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return SampledFrame(seq, 1700000000.0 + seq, img, np.array([0.5, 0.3, 0.2], np.float32), LABELS,
                        pb.ModelRef(name="m", version=1, sha256="ab"), [pb.LOW_CONFIDENCE])


def spool_only_publisher(tmp_path: Path, **mqtt: object) -> Publisher:
    cfg = EdgeConfig()
    cfg.mqtt.host = ""  # no broker: frames stay in the spool, where the test reads them
    for k, v in mqtt.items():
        setattr(cfg.mqtt, k, v)
    return publisher_for(cfg, "sink1", tmp_path / "spool")


def spooled_frames(pub: Publisher) -> list:
    return [pb.Frame.FromString(p) for _, p in pub.spool.after(None, 10 ** 6)]


def test_frames_are_built_and_spooled_in_order_and_close_drains(tmp_path: Path) -> None:
    pub = spool_only_publisher(tmp_path)
    encoding, storing = threading.Event(), threading.Event()

    class SlowBuilder(FrameBuilder):
        def build(self, s: SampledFrame) -> pb.Frame:
            encoding.wait(10)  # hold the encoding thread: the queue fills and put() has to wait
            return super().build(s)

    def slow_publish(frame: pb.Frame) -> bool:
        storing.wait(10)  # hold the spool thread: encoding goes on meanwhile
        return pub.publish_frame(frame)

    builder = SlowBuilder("sink1", "b00t", "cam0", top_k=2, jpeg_quality=80, max_side=100)
    worker = SinkWorker(builder, slow_publish, queue_size=2).start()
    putter = threading.Thread(target=lambda: [worker.put(sampled(i, seed=i)) for i in range(1, 7)])
    putter.start()
    # frame 1 held by the encoding thread, 2 and 3 queued, the producer waits to hand over frame 4
    wait_for(lambda: worker.sampled == 4 and worker.pending == 2, 10, what="the sink queue full")
    assert putter.is_alive()  # back-pressure: the bounded queue made the producer wait, nothing dropped
    assert worker.sampled == 4 and worker.spooled == 0
    encoding.set()  # a slow disk does not hold camera frames: they are all encoded while it waits
    putter.join(10)
    wait_for(lambda: worker.pending == 0 and worker.sampled == 6, 10, what="all frames encoded")
    assert worker.spooled == 0
    storing.set()
    putter.join(10)
    assert worker.close(10)
    worker.put(sampled(7, seed=7))  # after close: handled on the caller's thread, not lost
    assert (worker.sampled, worker.spooled, worker.refused, worker.errors) == (7, 7, 0, 0)
    frames = spooled_frames(pub)
    assert [f.frame_id for f in frames] == [f"sink1-b00t-{i}" for i in range(1, 8)]
    assert [f.sequence for f in frames] == list(range(7))
    f = frames[0]
    assert (f.width, f.height) == (100, 75) and f.image_format == "jpeg" and f.image_bytes == len(f.image)
    assert [t.label for t in f.top_k] == ["bright", "dark"] and list(f.reasons) == [pb.LOW_CONFIDENCE]
    img = cv2.imdecode(np.frombuffer(f.image, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (75, 100, 3)


def test_a_frame_over_max_payload_is_re_encoded_smaller(tmp_path: Path) -> None:
    limit = 40_000
    pub = spool_only_publisher(tmp_path, max_payload_bytes=limit)
    builder = FrameBuilder("sink1", "b00t", "cam0", top_k=3, jpeg_quality=95, max_side=1280, max_bytes=limit)
    s = sampled(1, h=480, w=640)  # noise: ~400 KB as a quality-95 JPEG
    assert len(builder.encode(s.bgr)[0]) > 5 * limit
    frame = builder.build(s)
    assert frame.ByteSize() <= limit and builder.reencoded == 1
    assert max(frame.width, frame.height) < 640 and frame.image_bytes == len(frame.image)
    img = cv2.imdecode(np.frombuffer(frame.image, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (frame.height, frame.width, 3)
    assert pub.publish_frame(frame)
    assert spooled_frames(pub)[0].frame_id == "sink1-b00t-1"


def test_a_frame_that_cannot_shrink_enough_is_refused_and_counted(tmp_path: Path) -> None:
    limit = 400  # below what even an 80x60 noise JPEG needs
    pub = spool_only_publisher(tmp_path, max_payload_bytes=limit)
    builder = FrameBuilder("sink1", "b00t", "cam0", top_k=3, jpeg_quality=95, max_side=1280, max_bytes=limit)
    worker = SinkWorker(builder, pub.publish_frame, queue_size=4).start()
    worker.put(sampled(1, h=480, w=640))
    assert worker.close(10)
    assert (worker.sampled, worker.spooled, worker.refused) == (1, 0, 1)
    assert pub.oversize_refused == 1 and pub.spool_stats()[1] == 0


def test_an_unencodable_frame_is_counted_and_the_next_one_goes(tmp_path: Path) -> None:
    pub = spool_only_publisher(tmp_path)
    builder = FrameBuilder("sink1", "b00t", "cam0", top_k=3, jpeg_quality=80, max_side=0)
    worker = SinkWorker(builder, pub.publish_frame, queue_size=4).start()
    bad = sampled(1)
    bad.bgr = np.zeros((10, 10, 5), np.uint8)  # five channels: OpenCV cannot make a JPEG of it
    worker.put(bad)
    worker.put(sampled(2))
    assert worker.close(10)
    assert (worker.sampled, worker.spooled, worker.errors) == (2, 1, 1)
    assert [f.frame_id for f in spooled_frames(pub)] == ["sink1-b00t-2"]


def test_downscale_matches_an_area_resize_at_any_factor() -> None:
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (27, 48, 3), dtype=np.uint8)
    img = cv2.resize(small, (1920, 1080), interpolation=cv2.INTER_CUBIC)  # a smooth camera-size scene
    for side, shape in ((640, (360, 640, 3)), (1280, (720, 1280, 3)), (500, (281, 500, 3)), (2000, img.shape)):
        out = downscale(img, side)
        assert out.shape == shape
        ref = cv2.resize(img, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
        assert np.abs(out.astype(np.int16) - ref).mean() < 2.0  # the same picture
    assert downscale(img, 0) is img


def test_the_sink_thread_runs_at_a_lower_priority(tmp_path: Path) -> None:
    import os
    import sys

    import pytest

    from edge.uplink.sink import SINK_NICENESS

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread priorities are set on Linux only")
    seen = []

    def publish(frame: pb.Frame) -> bool:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return True

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    worker = SinkWorker(FrameBuilder("sink1", "b00t", "cam0", 1, 80, 0), publish, queue_size=2).start()
    worker.put(sampled(1))
    assert worker.close(10)
    assert seen == [min(19, mine + SINK_NICENESS)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # this thread is unchanged


def test_a_low_quality_frame_over_the_limit_is_not_re_encoded_identically() -> None:
    class Counting(FrameBuilder):
        calls: list = []

        def encode(self, bgr, quality=None, max_side=None):  # noqa: ANN001, ANN201
            self.calls.append((quality, max_side))
            return super().encode(bgr, quality, max_side)

    limit = 40_000
    builder = Counting("sink1", "b00t", "cam0", top_k=3, jpeg_quality=30, max_side=1280, max_bytes=limit)
    s = sampled(1, h=480, w=640)  # noise: over the limit even at quality 30
    assert len(builder.encode(s.bgr)[0]) > limit
    builder.calls.clear()
    frame = builder.build(s)
    assert frame.ByteSize() <= limit
    # the first encoding, then straight to half the size (quality 30 at full size was tried already)
    assert builder.calls[:2] == [(None, None), (30, 320)]
