"""Camera sources: video file, USB (V4L2), RTSP, a test pattern; one module per kind
(edge.sources.opencv, .pattern, .gstreamer) on edge.sources.base.

Every source is a :class:`FrameSource`: ``open()``, ``read() -> (ok, bgr, capture_time)`` and
``close()``; ``ok`` False means the source has ended (file end, ``max_frames`` reached, closed).
Live sources (``live`` True) never end on their own: a failed open, a read error or a stall
(no frame for ``stall_timeout_s``) closes the device and reopens it with exponential backoff
(``reconnect_initial_s`` doubling up to ``reconnect_max_s``), logging one line per kind of
failure rather than one per attempt; a reopened source counts as recovered only after delivering
frames for STABLE_AFTER_S. A GStreamer pipeline's end of stream (exit 0) ends the source; a failed
pipeline (non-zero exit) is reported with gst's ERROR line and reopened. Corrupt frames are counted
(``corrupt``) and skipped; in a file, ``max_corrupt_in_row`` undecodable frames in a row end it.
"""


from __future__ import annotations

from edge.config import SourceConfig
from edge.errors import SourceError
from edge.sources.base import END, STABLE_AFTER_S, EndOfStream, FramePool, FrameSource, LiveSource, valid_frame
from edge.sources.gstreamer import GStreamerSource
from edge.sources.opencv import FileSource, OpenCVLiveSource, RTSPSource, V4L2Source, open_capture
from edge.sources.pattern import TestPatternSource

__all__ = ["END", "STABLE_AFTER_S", "EndOfStream", "FileSource", "FramePool", "FrameSource", "GStreamerSource",
           "LiveSource", "OpenCVLiveSource", "RTSPSource", "TestPatternSource", "V4L2Source", "open_capture",
           "open_source", "valid_frame"]

KINDS = {"file": FileSource, "v4l2": V4L2Source, "rtsp": RTSPSource, "gstreamer": GStreamerSource,
         "testpattern": TestPatternSource}


def open_source(cfg: SourceConfig) -> FrameSource:
    """Build and open the source ``cfg`` describes. SourceError when a file is unreadable."""
    try:
        cls = KINDS[cfg.kind]
    except KeyError:
        raise SourceError(f"unknown source kind {cfg.kind!r} ({', '.join(KINDS)})") from None
    src: FrameSource = cls(cfg)
    return src.open()
