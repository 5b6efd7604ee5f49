"""Sources: video file, GStreamer pipe (videotestsrc), test pattern, RTSP reconnect/backoff."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

from edge.config import SourceConfig
from edge.demo import write_video
from edge.errors import SourceError
from edge.sources import FileSource, GStreamerSource, RTSPSource, TestPatternSource, open_source
from tests.helpers.broker import free_port
from tests.helpers.wait import wait_for


def read_all(src, limit: int = 1000):  # noqa: ANN001, ANN201
    frames = []
    while len(frames) < limit:
        ok, frame, t = src.read()
        if not ok:
            break
        assert t > 0
        frames.append(frame)
    return frames


def test_file_source_reads_every_frame(tmp_path):  # noqa: ANN001
    levels = [0.1, 0.5, 0.9] * 4
    video = write_video(tmp_path / "v.avi", levels, width=160, height=120)
    src = open_source(SourceConfig(kind="file", uri=str(video)))
    assert isinstance(src, FileSource) and not src.live
    frames = read_all(src)
    src.close()
    assert len(frames) == len(levels)
    assert all(f.shape == (120, 160, 3) and f.dtype == np.uint8 for f in frames)
    means = [f.mean() / 255 for f in frames]
    assert means == pytest.approx(levels, abs=0.05)
    assert src.corrupt == 0


def test_file_source_max_frames_and_loop(tmp_path):  # noqa: ANN001
    video = write_video(tmp_path / "v.avi", [0.2, 0.8, 0.5], width=64, height=48)
    src = open_source(SourceConfig(kind="file", uri=str(video), loop=True, max_frames=7))
    frames = read_all(src)
    src.close()
    assert len(frames) == 7
    assert frames[3].mean() == pytest.approx(frames[0].mean(), abs=3)


def test_unreadable_file_is_a_clear_error(tmp_path):  # noqa: ANN001
    bad = tmp_path / "corrupt.avi"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00AVI garbage" + bytes(range(256)) * 20)
    with pytest.raises(SourceError, match=r"cannot decode video file .*corrupt\.avi"):
        open_source(SourceConfig(kind="file", uri=str(bad)))
    with pytest.raises(SourceError, match="does not exist"):
        open_source(SourceConfig(kind="file", uri=str(tmp_path / "missing.mp4")))


@pytest.mark.skipif(shutil.which("gst-launch-1.0") is None, reason="gst-launch-1.0 not installed")
def test_gstreamer_pipe_delivers_frames_of_the_right_size():
    cfg = SourceConfig(kind="gstreamer", uri="videotestsrc num-buffers=6 pattern=smpte", width=176,
                       height=144, max_frames=6)
    src = open_source(cfg)
    assert isinstance(src, GStreamerSource) and src.live
    assert src.command()[-6:] == ["videoscale", "!", "video/x-raw,format=BGR,width=176,height=144", "!",
                                  "fdsink", "fd=1"]
    frames = read_all(src)
    src.close()
    assert len(frames) == 6
    assert all(f.shape == (144, 176, 3) for f in frames)
    assert frames[0].std() > 10  # colour bars, not a blank buffer


@pytest.mark.skipif(shutil.which("gst-launch-1.0") is None, reason="gst-launch-1.0 not installed")
def test_gstreamer_bad_pipeline_is_retried_not_fatal():
    cfg = SourceConfig(kind="gstreamer", uri="nosuchelement_xyz", width=64, height=48,
                       reconnect_initial_s=0.01, reconnect_max_s=0.04)
    src = open_source(cfg)
    t = threading.Thread(target=src.read)
    t.start()
    wait_for(lambda: src.failures >= 3, 20, what="3 failed gst attempts")
    src.close()
    t.join(10)
    assert not t.is_alive()


def test_test_pattern_brightness_and_motion():
    cfg = SourceConfig(kind="testpattern", width=160, height=120, fps=0, pattern_brightness=[0.5, 0.9],
                       max_frames=4)
    src = open_source(cfg)
    assert isinstance(src, TestPatternSource) and not src.live
    frames = read_all(src)
    assert len(frames) == 4
    assert [round(f.mean() / 255, 1) for f in frames] == [0.5, 0.9, 0.5, 0.9]
    assert not np.array_equal(frames[0], frames[2])   # it moves
    src2 = TestPatternSource(SourceConfig(kind="testpattern", width=64, height=48, fps=0))
    src2.brightness = 0.2
    ok, frame, _ = src2.read()
    assert ok and frame.mean() / 255 == pytest.approx(0.2, abs=0.03)


def test_rtsp_unreachable_is_retried_with_growing_backoff():
    url = f"rtsp://127.0.0.1:{free_port()}/stream"
    cfg = SourceConfig(kind="rtsp", uri=url, reconnect_initial_s=0.02, reconnect_max_s=0.08,
                       stall_timeout_s=2)
    src = open_source(cfg)   # not fatal
    assert isinstance(src, RTSPSource) and src.live
    result = []
    t = threading.Thread(target=lambda: result.append(src.read()))
    t.start()
    wait_for(lambda: src.attempts >= 5, 20, what="5 reconnect attempts")
    src.close()
    t.join(10)
    assert not t.is_alive() and result[0][0] is False
    b = list(src.backoffs)
    assert b[:3] == [0.02, 0.04, 0.08] and max(b) == 0.08
    assert "rtsp_transport;tcp" in __import__("os").environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"]
