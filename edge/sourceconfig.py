"""One camera's config: ``[source]`` (a device with one camera) or each table of ``[[sources]]`` (several
cameras on one daemon, one interpreter; edge.pipeline.loop schedules them fairly). Re-exported by
edge.config, which holds the rest of edge.toml."""

from __future__ import annotations

import dataclasses
import re
from typing import List

from proto.tomlconf import check_not_negative, check_positive, field

GST_PRESETS = ("csi", "usb", "usb-mjpeg", "test")  # expanded by edge.sources.gstreamer.preset_pipeline
DROP_POLICIES = ("auto", "drop_oldest", "block")
SOURCE_NAME_RULE = "1-64 characters: letters, digits, '.', '_', '-', starting with a letter or digit"
_SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def valid_source_name(name: str) -> bool:
    """A source name goes into every frame message, Prometheus labels and log lines: kept plain."""
    return bool(_SOURCE_NAME.fullmatch(name))


@dataclasses.dataclass
class SourceConfig:
    kind: str = field("testpattern", doc="file, v4l2, rtsp, gstreamer or testpattern.")
    uri: str = field("", doc="file: a video path; v4l2: an index or /dev/videoN; rtsp: rtsp://...; "
                             "gstreamer: the pipeline up to (not including) the appsink/fdsink, or with "
                             "a preset the camera it names (csi: the sensor id, default 0; usb, "
                             "usb-mjpeg: the device, default /dev/video0).")
    preset: str = field("", doc="gstreamer: a ready pipeline instead of uri: csi (nvarguscamerasrc -> "
                                "nvvidconv, a Jetson's CSI camera), usb (v4l2src raw, converted by nvvidconv "
                                "where it exists), usb-mjpeg (v4l2src MJPEG, decoded by nvv4l2decoder where "
                                "it exists, else jpegdec) or test (videotestsrc); width, height and fps "
                                "are asked of the camera. Empty = uri is the pipeline.")
    name: str = field("cam0", doc="Name of this source, carried in every frame message, its metrics' "
                                  f"source label and log lines ({SOURCE_NAME_RULE}); unique among "
                                  "[[sources]].")
    width: int = field(640, doc="Frame width requested from v4l2/gstreamer/testpattern sources.")
    height: int = field(480, doc="Frame height requested from v4l2/gstreamer/testpattern sources.")
    fps: float = field(30.0, doc="Frame rate requested (testpattern paces itself at it; 0 = unpaced).")
    loop: bool = field(False, doc="file: start again at the end instead of stopping.")
    realtime: bool = field(False, doc="file: pace reading at the file's frame rate like a live camera.")
    max_frames: int = field(0, doc="Stop after this many frames (0 = no limit); for tests and demos.")
    reconnect_initial_s: float = field(0.5, doc="First wait before reopening a failed live source.")
    reconnect_max_s: float = field(30.0, doc="Longest wait between reopen attempts (exponential backoff).")
    stall_timeout_s: float = field(10.0, doc="A live source that delivers no frame for this long is reopened.")
    max_corrupt_in_row: int = field(100, doc="A file source stops after this many unreadable frames in a row.")
    decode_threads: int = field(1, doc="file/rtsp: threads FFmpeg may use to decode. 1 keeps decoding one "
                                       "pipeline stage on one core beside inference (FFmpeg's own choice, 0, "
                                       "adds helper threads that compete with inference for the same cores "
                                       "and only pay off when cores sit idle).")
    pattern_brightness: List[float] = field(doc="testpattern: mean brightness levels (0..1) the moving "
                                                 "pattern cycles through, one per frame.",
                                            factory=lambda: [0.5])
    queue_size: int = field(0, doc="Frames of this source buffered for inference; 0 = its share of [pipeline] "
                                   "queue_size.")
    drop_policy: str = field("", doc="When this source's queue is full: auto, drop_oldest or block (as "
                                     "[pipeline] drop_policy); empty = [pipeline] drop_policy.")

    def validate(self) -> None:
        kinds = ("file", "v4l2", "rtsp", "gstreamer", "testpattern")
        if self.kind not in kinds:
            raise ValueError(f"kind must be one of {', '.join(kinds)}, not {self.kind!r}")
        if not valid_source_name(self.name):
            raise ValueError(f"name {self.name!r} is not a source name ({SOURCE_NAME_RULE})")
        if self.preset and self.kind != "gstreamer":
            raise ValueError(f"preset is for kind = \"gstreamer\", not {self.kind!r}")
        if self.preset and self.preset not in GST_PRESETS:
            raise ValueError(f"unknown preset {self.preset!r} ({', '.join(GST_PRESETS)})")
        if self.preset == "csi" and self.uri and not self.uri.isdigit():
            raise ValueError(f"preset csi: uri is the camera's sensor id (0, 1, ...), not {self.uri!r}")
        if self.kind in ("file", "rtsp", "gstreamer", "v4l2") and not self.uri and not self.preset:
            raise ValueError(f"kind={self.kind!r} needs uri" + (" or preset" if self.kind == "gstreamer" else ""))
        if self.width <= 0 or self.height <= 0:
            raise ValueError("width and height must be positive")
        if self.reconnect_initial_s <= 0 or self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("need 0 < reconnect_initial_s <= reconnect_max_s")
        check_positive(self, "stall_timeout_s", "max_corrupt_in_row")
        check_not_negative(self, "fps", "max_frames", "decode_threads", "queue_size")
        if not self.pattern_brightness or not all(0.0 <= b <= 1.0 for b in self.pattern_brightness):
            raise ValueError("pattern_brightness needs one or more levels within 0..1")
        if self.drop_policy and self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be empty ([pipeline] drop_policy) or one of "
                             f"{', '.join(DROP_POLICIES)}, not {self.drop_policy!r}")
