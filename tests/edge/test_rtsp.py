"""The RTSP source against a real RTSP server (gst-rtsp-server): frames, a camera that dies mid-stream
and comes back on the same address, reconnect with backoff, never fatal."""

from __future__ import annotations

import logging
import threading
from typing import List

import pytest

from edge.config import SourceConfig
from edge.sources import RTSPSource, open_source
from tests.helpers.rtsp import RtspCamera
from tests.helpers.wait import wait_for


def rtsp_cfg(url: str) -> SourceConfig:
    return SourceConfig(kind="rtsp", uri=url, name="door", reconnect_initial_s=0.1, reconnect_max_s=0.4,
                        stall_timeout_s=2.0)


class Reader:
    """Reads the source on its own thread, as the daemon's capture thread does."""

    def __init__(self, src: RTSPSource) -> None:
        self.src = src
        self.shapes: List[tuple] = []
        self.ended = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            ok, frame, _ = self.src.read()
            if not ok:
                self.ended = True
                return
            self.shapes.append(frame.shape)


def test_rtsp_frames_then_camera_restart_is_survived(camera: RtspCamera) -> None:
    src = open_source(rtsp_cfg(camera.url))
    assert isinstance(src, RTSPSource) and src.live
    reader = Reader(src)
    try:
        wait_for(lambda: len(reader.shapes) >= 5, 30, what="5 frames from the RTSP camera")
        assert set(reader.shapes) == {(240, 320, 3)}
        assert src.failures == 0
        camera.stop()                                   # the camera dies mid-stream
        wait_for(lambda: src.failures >= 2, 30, what="the source to notice and retry")
        assert not reader.ended                         # retried, not fatal
        before = len(reader.shapes)
        camera.start()                                  # back on the same address
        wait_for(lambda: len(reader.shapes) >= before + 5, 60, what="frames again after the restart")
        assert src.attempts >= 3 and src.backoffs
        assert max(src.backoffs) <= 0.4 + 1e-9          # exponential backoff, capped at reconnect_max_s
    finally:
        src.request_stop()
        reader.thread.join(30)
        src.close()
    assert reader.ended and not reader.thread.is_alive()


def test_rtsp_credentials_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    src = RTSPSource(rtsp_cfg("rtsp://admin:s3cret@127.0.0.1:1/cam"))  # nothing listens on port 1
    reader = Reader(src.open())
    try:
        wait_for(lambda: src.failures >= 2, 30, what="failed opens")
    finally:
        src.request_stop()
        reader.thread.join(30)
        src.close()
    assert "rtsp://***@127.0.0.1:1/cam" in caplog.text and "open failed" in caplog.text
    assert "s3cret" not in caplog.text
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING and "open failed" in r.getMessage()]
    assert len(warned) == 1                          # logged once per kind, not per attempt (the rest at DEBUG)
