"""The edge daemon's configuration (``edge.toml``): one typed tree, every field documented.

Unknown keys are rejected by name (proto.tomlconf). ``kestrel-edge run --check-config`` loads and
validates it and exits (systemd ``ExecStartPre``). ``kestrel-edge config-doc`` prints this
documentation; docs/edge-config.md is generated from it (``kestrel-edge config-doc >
docs/edge-config.md``; a test fails when it is stale).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import List, Optional, Union

from edge.confighub import MqttConfig, UpdateConfig
from edge.sourceconfig import GST_PRESETS as GST_PRESETS  # re-exported: edge.config is the config's one door
from edge.sourceconfig import SourceConfig as SourceConfig
from proto import tomlconf, topics
from proto.tomlconf import check_not_negative as _not_negative
from proto.tomlconf import check_positive as _positive
from proto.tomlconf import field

MiB = 1024 * 1024
__all__ = ["GST_PRESETS", "DeviceConfig", "EdgeConfig", "ModelConfig", "MqttConfig", "PipelineConfig",
           "SamplerConfig", "SourceConfig", "SpoolConfig", "TelemetryConfig", "UpdateConfig", "describe",
           "from_dict", "load", "usable_cores"]


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass
class DeviceConfig:
    id: str = field("", doc="Device id used in MQTT topics and frame ids; empty = the hostname. One topic "
                            "segment: no '/', '+', '#', not starting with '$'.")
    group: str = field("default", doc="Fleet group: the device follows kestrel/v1/groups/{group}/desired "
                                      "(one topic segment, like id).")
    data_dir: str = field("./kestrel-data", doc="Where the spool, model slots and state files live.")
    log_level: str = field("INFO", doc="DEBUG, INFO, WARNING or ERROR.")

    def validate(self) -> None:
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, not {self.log_level!r}")
        topics.check_segment(self.resolved_id, "id")  # an MQTT topic segment, as the topics are built
        topics.check_segment(self.group, "group")
        if not self.data_dir:
            raise ValueError("data_dir must not be empty")

    @property
    def resolved_id(self) -> str:
        return self.id or socket.gethostname()


@dataclasses.dataclass
class ModelConfig:
    path: str = field("", doc="A .tflite file or a signed bundle (.kbundle) to run when no slot is "
                              "installed yet; empty = the active slot in data_dir.")
    labels: str = field("", doc="Labels file, one per line (for a bare .tflite); bundles carry their own.")
    runtime: str = field("auto", doc="auto, tflite-runtime, ai-edge-litert or tensorflow. auto tries "
                                     "tflite-runtime then ai-edge-litert; tensorflow (tf.lite, a full "
                                     "TensorFlow install) is used only when named here.")
    threads: int = field(0, doc="Interpreter threads; 0 = the cores this process may use "
                                "(os.sched_getaffinity: all 4 on a Jetson Nano, fewer under a CPUAffinity= "
                                "or taskset). Set 1 less than that to leave a core to capture and encoding.")
    color_order: str = field("rgb", doc="Channel order the model expects: rgb or bgr (bundles say it).")
    normalization: str = field("0_1", doc="Float input scaling: 0_1, -1_1 or raw (0..255); "
                                          "quantized inputs use the model's scale/zero point on top.")
    resize: str = field("stretch", doc="stretch or center_crop to the model's input size.")
    top_k: int = field(3, doc="How many top scores each frame message carries.")

    def validate(self) -> None:
        if self.runtime not in ("auto", "tflite-runtime", "ai-edge-litert", "tensorflow"):
            raise ValueError("runtime must be auto, tflite-runtime, ai-edge-litert or tensorflow, "
                             f"not {self.runtime!r}")
        if self.color_order not in ("rgb", "bgr"):
            raise ValueError("color_order must be rgb or bgr")
        if self.normalization not in ("0_1", "-1_1", "raw"):
            raise ValueError("normalization must be 0_1, -1_1 or raw")
        if self.resize not in ("stretch", "center_crop"):
            raise ValueError("resize must be stretch or center_crop")
        if not 0 <= self.threads <= 64:
            raise ValueError("threads must be 0 (the cores this process may use) .. 64")
        if self.top_k < 1:
            raise ValueError("top_k must be >= 1")

    @property
    def resolved_threads(self) -> int:
        """``threads``, with 0 resolved to the cores this process may run on."""
        return self.threads or usable_cores()


@dataclasses.dataclass
class PipelineConfig:
    queue_size: int = field(4, doc="Frames buffered between capture and inference. With several [[sources]] "
                                   "this is shared: each source queues queue_size / sources frames, at "
                                   "least MIN_SOURCE_QUEUE (2), unless it sets its own queue_size (camera "
                                   "frames are megabytes each; round-robin keeps the model fed from 2 each).")
    drop_policy: str = field("auto", doc="auto (drop_oldest for live sources, block for files), "
                                         "drop_oldest or block.")
    sink_queue_size: int = field(8, doc="Sampled frames waiting for JPEG encoding and the spool write, "
                                        "which run on their own thread; when full, inference waits "
                                        "(a sampled frame is never dropped).")
    max_batch: int = field(1, doc="Several sources: up to this many queued frames (taken round-robin from "
                                  "the sources) go through one invoke, the interpreter's input resized to "
                                  "the batch (models with a dynamic batch dimension; others run frame by "
                                  "frame). 1 = one frame per invoke: on the CPU runtimes measured a batch "
                                  "costs as much per frame (docs/edge.md, Several cameras).")

    def validate(self) -> None:
        if self.queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        if not 1 <= self.max_batch <= 64:
            raise ValueError(f"max_batch must be 1..64, not {self.max_batch}")
        if self.sink_queue_size < 1:
            raise ValueError("sink_queue_size must be >= 1")
        if self.drop_policy not in ("auto", "drop_oldest", "block"):
            raise ValueError("drop_policy must be auto, drop_oldest or block")


@dataclasses.dataclass
class SamplerConfig:
    strategies: List[str] = field(doc="Any of confidence, margin, entropy; a frame is sampled when any "
                                      "fires.", factory=lambda: ["confidence"])
    confidence_threshold: Optional[float] = field(None, doc="confidence: sample when the top score is below "
                                                           "this. Unset = the running bundle's "
                                                           "default_threshold (followed across model "
                                                           "updates), 0.6 for a bare .tflite; a value set "
                                                           "here always wins.")
    margin_threshold: float = field(0.1, doc="margin: sample when top-1 minus top-2 is below this.")
    entropy_threshold: float = field(0.9, doc="entropy: sample when normalized entropy (0..1) is above this.")
    max_per_minute: int = field(30, doc="Rate limit: frames sent per rolling minute (0 = none). The "
                                        "limits hold across restarts (state in data_dir).")
    max_per_hour: int = field(600, doc="Rate limit: frames sent per rolling hour (0 = none).")
    max_per_day: int = field(5000, doc="Rate limit: frames sent per rolling day (0 = none).")
    dedup_distance: int = field(6, doc="Near-duplicate suppression: a frame whose 64-bit perceptual hash "
                                       "is within this Hamming distance of a recent sent one is skipped "
                                       "(-1 = off).")
    dedup_window_s: float = field(300.0, doc="How long a sent frame's hash suppresses look-alikes.")
    dedup_history: int = field(256, doc="How many recent hashes are remembered.")
    jpeg_quality: int = field(85, doc="JPEG quality of forwarded frames.")
    max_image_side: int = field(640, doc="Forwarded frames are downscaled so no side exceeds this "
                                         "(0 = never). 640 is at least twice the input of the "
                                         "classifiers Kestrel trains (<= 320 px), and a quarter of a "
                                         "720p frame's pixels: ~2.5x smaller messages (uplink, spool, "
                                         "hub storage) and cheaper to encode on the device. Raise it "
                                         "to label fine detail.")

    def validate(self) -> None:
        bad = set(self.strategies) - {"confidence", "margin", "entropy"}
        if bad:
            raise ValueError(f"unknown sampler strategy {sorted(bad)[0]!r} (confidence, margin, entropy)")
        for n in ("confidence_threshold", "margin_threshold", "entropy_threshold"):
            value = getattr(self, n)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{n} must be within 0..1")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be 1..100")
        _not_negative(self, "max_per_minute", "max_per_hour", "max_per_day", "max_image_side")
        if self.dedup_distance < -1 or self.dedup_distance > 64:
            raise ValueError("dedup_distance must be -1 (off) .. 64")
        _positive(self, "dedup_window_s", "dedup_history")


@dataclasses.dataclass
class SpoolConfig:
    max_bytes: int = field(256 * MiB, doc="Disk budget of the outgoing-frame spool. When full, the oldest "
                                          "frames are evicted first (and counted).")
    max_frames: int = field(100000, doc="Frame-count budget of the spool (oldest evicted first, counted).")
    fsync: bool = field(True, doc="fsync every frame written to the spool (power-cut safe).")
    max_dead_letters: int = field(100, doc="Frames set aside because the broker kept refusing them "
                                           "(kept in {data_dir}/spool/dead, oldest removed first).")

    def validate(self) -> None:
        if self.max_bytes < 64 * 1024:
            raise ValueError("max_bytes must be at least 65536")
        _positive(self, "max_frames")
        _not_negative(self, "max_dead_letters")


@dataclasses.dataclass
class TelemetryConfig:
    interval_s: float = field(10.0, doc="Seconds between telemetry messages (0 = off).")
    metrics_port: int = field(9108, doc="Prometheus /metrics port (0 = off).")
    metrics_bind: str = field("127.0.0.1", doc="Address the /metrics endpoint listens on.")
    tegrastats: str = field("auto", doc="Jetson readings (CPU and GPU load, temperatures, power rails, EMC) "
                                        "from NVIDIA's tegrastats, in telemetry and /metrics: auto (when "
                                        "tegrastats is on PATH), off, or the path of the tegrastats binary.")
    tegrastats_interval_ms: int = field(1000, doc="tegrastats --interval: milliseconds between readings.")

    def validate(self) -> None:
        _not_negative(self, "interval_s")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be 0..65535 (0 = off), not {self.metrics_port}")
        if self.metrics_port and not self.metrics_bind:
            raise ValueError("metrics_bind must not be empty while metrics_port is set")
        if not self.tegrastats:
            raise ValueError("tegrastats must be auto, off or a path")
        if not 100 <= self.tegrastats_interval_ms <= 60000:
            raise ValueError(f"tegrastats_interval_ms must be 100..60000, not {self.tegrastats_interval_ms}")


@dataclasses.dataclass
class EdgeConfig:
    device: DeviceConfig = field(doc="Who this device is and where it keeps state.", factory=DeviceConfig)
    source: Optional[SourceConfig] = field(None, doc="The camera, on a device with one. Give either [source] "
                                                    "or [[sources]]; with neither, a test pattern named cam0.")
    sources: List[SourceConfig] = field(doc="Several cameras on one daemon and one interpreter, one "
                                            "[[sources]] table each, every one with its own name (frame "
                                            "messages and metrics carry it), queue, drop policy, fps and "
                                            "reconnect; scheduled round-robin, so a fast camera cannot "
                                            "starve a slow one.", factory=list)
    model: ModelConfig = field(doc="The model and its runtime.", factory=ModelConfig)
    pipeline: PipelineConfig = field(doc="Capture to inference buffering.", factory=PipelineConfig)
    sampler: SamplerConfig = field(doc="Which frames are forwarded to the hub.", factory=SamplerConfig)
    mqtt: MqttConfig = field(doc="The MQTT broker.", factory=MqttConfig)
    spool: SpoolConfig = field(doc="The durable outgoing-frame spool.", factory=SpoolConfig)
    telemetry: TelemetryConfig = field(doc="Telemetry over MQTT and Prometheus.", factory=TelemetryConfig)
    update: UpdateConfig = field(doc="Signed model updates and rollback.", factory=UpdateConfig)

    def validate(self) -> None:
        if self.source is not None and self.sources:
            raise ValueError("give either [source] (one camera) or [[sources]] (several), not both")
        names = [s.name for s in self.sources]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"two [[sources]] are named {twice[0]!r}: each needs its own name")

    @property
    def camera_sources(self) -> List[SourceConfig]:
        """Every camera this daemon reads: the [[sources]], else [source], else the default test pattern."""
        return list(self.sources) or [self.source if self.source is not None else SourceConfig()]

    @property
    def data_dir(self) -> Path:
        return Path(self.device.data_dir)

    @property
    def trust_dir(self) -> Path:
        return Path(self.update.trust_dir) if self.update.trust_dir else self.data_dir / "trust"

    @property
    def hub_ca_file(self) -> str:
        """The CA a download verifies the hub with: [update] ca_file, else [mqtt] ca_file with [mqtt] tls."""
        return self.update.ca_file or (self.mqtt.ca_file if self.mqtt.tls else "")


def load(path: Union[str, Path, None]) -> EdgeConfig:
    return tomlconf.load(EdgeConfig, path)


def from_dict(data: dict) -> EdgeConfig:
    return tomlconf.from_dict(EdgeConfig, data)


def describe() -> str:
    return ("# edge.toml reference\n\n"
            "Every key of the edge daemon's config, its type, default and meaning. Generated from\n"
            "edge/config.py by `kestrel-edge config-doc > docs/edge-config.md`; do not edit by hand (a test\n"
            "fails when this page is stale). Unknown keys are refused by name; `kestrel-edge run\n"
            "--check-config` validates a file and exits.\n"
            + "\n".join(tomlconf.describe(EdgeConfig)) + "\n")
