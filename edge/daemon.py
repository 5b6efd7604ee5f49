"""``kestrel-edge run``: camera -> model -> sampled frames over MQTT, until SIGTERM or the file ends.

Wiring: config -> Stats, Publisher (durable spool + MQTT), TelemetryService, ModelHolder,
UpdateService (boot model, desired state, trial watch), source, Sampler, Pipeline. Sampled frames
become ``kestrel_pb2.Frame`` messages (JPEG image, top-k, reasons) handed to the publisher, which
spools them (fsync) before sending. SIGTERM/SIGINT: stop capture, drain queued frames through
inference, flush the publisher, exit 0. A file source that ends does the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, List, Optional, cast

import cv2
import numpy as np

from edge import __version__, config
from edge.errors import ConfigError
from edge.pipeline import ModelHolder, Pipeline, SampledFrame
from edge.runtime import Model, load_labels, load_model
from edge.sampler import Sampler
from edge.sources import open_source
from proto import kestrel_pb2

log = logging.getLogger("edge.daemon")

FLUSH_TIMEOUT_S = 5.0      # publisher flush on shutdown
PIPELINE_DRAIN_S = 30.0    # longest wait for queued frames to go through inference on shutdown
POLL_S = 0.2               # main-thread wake-up interval while running


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default="edge.toml", help="edge.toml path (default: ./edge.toml)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config (and that the model file and source are plausible), "
                             "then exit")


# --- config checks -------------------------------------------------------------------------------
def check_plausible(cfg: config.EdgeConfig) -> List[str]:
    """Problems that make the config unusable on this machine (empty = fine)."""
    problems: List[str] = []
    src = cfg.source
    if src.kind == "file" and not Path(src.uri).is_file():
        problems.append(f"source.uri: video file {src.uri} does not exist")
    if src.kind == "gstreamer" and not shutil.which("gst-launch-1.0"):
        problems.append("source.kind = gstreamer needs gst-launch-1.0 (apt install gstreamer1.0-tools)")
    if src.kind == "rtsp" and not src.uri.lower().startswith(("rtsp://", "rtsps://")):
        problems.append(f"source.uri: {src.uri!r} is not an rtsp:// URL")
    if src.kind == "v4l2" and not src.uri.isdigit() and not src.uri.startswith("/dev/"):
        problems.append(f"source.uri: {src.uri!r} is neither a camera index nor a /dev/videoN path")
    m = cfg.model
    if m.path:
        p = Path(m.path)
        if not p.is_file():
            problems.append(f"model.path: {m.path} does not exist")
        elif p.suffix not in (".tflite", ".kbundle"):
            problems.append(f"model.path: {m.path} is neither a .tflite file nor a .kbundle bundle")
    if m.labels and not Path(m.labels).is_file():
        problems.append(f"model.labels: {m.labels} does not exist")
    return problems


def quiet_opencv(quiet: bool = True) -> None:
    """OpenCV logs a warning per failed open; our sources log one line per kind of failure instead."""
    try:
        lg = cv2.utils.logging  # type: ignore[attr-defined]
        lg.setLogLevel(lg.LOG_LEVEL_ERROR if quiet else lg.LOG_LEVEL_INFO)
    except AttributeError:  # pragma: no cover - builds without cv2.utils.logging
        pass


def load_config(path: str) -> config.EdgeConfig:
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist (pass --config PATH)")
    return config.load(path)


def initial_model(cfg: config.EdgeConfig) -> Model:
    """The configured fallback model (used when the updater has no installed slot)."""
    m = cfg.model
    if not m.path:
        raise ConfigError("no model: nothing is installed in data_dir and model.path is empty")
    if m.path.endswith(".kbundle"):
        raise ConfigError(f"model.path {m.path} is a bundle: install it with `kestrel-edge install {m.path}`"
                          " (or point model.path at a .tflite)")
    labels = load_labels(m.labels) if m.labels else None
    return load_model(m.path, labels=labels, runtime=m.runtime, threads=m.threads, name=Path(m.path).stem,
                      color_order=m.color_order, normalization=m.normalization, resize=m.resize)


# --- frame messages ------------------------------------------------------------------------------
class FrameBuilder:
    """Turns a SampledFrame into a kestrel_pb2.Frame (JPEG, top-k, reasons, ids)."""

    def __init__(self, device_id: str, boot_id: str, source_name: str, top_k: int, jpeg_quality: int,
                 max_side: int) -> None:
        self.device_id = device_id
        self.boot_id = boot_id
        self.source_name = source_name
        self.top_k = top_k
        self.jpeg_quality = jpeg_quality
        self.max_side = max_side

    def encode(self, bgr: np.ndarray) -> tuple[bytes, int, int]:
        h, w = bgr.shape[:2]
        side = max(h, w)
        if self.max_side > 0 and side > self.max_side:
            f = self.max_side / side
            w, h = max(1, int(round(w * f))), max(1, int(round(h * f)))
            bgr = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), int(self.jpeg_quality)])
        if not ok:
            from edge.errors import FrameError

            raise FrameError("JPEG encoding failed")
        return buf.tobytes(), w, h

    def build(self, s: SampledFrame) -> Any:
        image, w, h = self.encode(s.bgr)
        order = np.argsort(-s.scores, kind="stable")[: self.top_k]
        top = [kestrel_pb2.TopScore(index=int(i), label=s.labels[i] if i < len(s.labels) else str(i),
                                    score=float(s.scores[i])) for i in order]
        frame = kestrel_pb2.Frame(
            frame_id=f"{self.device_id}-{self.boot_id}-{s.seq}", device_id=self.device_id,
            capture_time_ms=int(s.capture_time * 1000), reasons=cast(Any, s.reasons), top_k=top, image=image,
            image_format="jpeg", width=w, height=h, source=self.source_name, image_bytes=len(image))
        if s.model_ref is not None:
            frame.model.CopyFrom(s.model_ref)
        return frame


# --- the daemon ------------------------------------------------------------------------------------
class Daemon:
    def __init__(self, cfg: config.EdgeConfig) -> None:
        from edge.publisher import Publisher
        from edge.telemetry import Stats, TelemetryService
        from edge.updater.service import UpdateService

        self.cfg = cfg
        self.device_id = cfg.device.resolved_id
        self.boot_id = secrets.token_hex(4)
        self.stop_requested = threading.Event()
        self.stats = Stats()
        self.publisher = Publisher(cfg, self.device_id, cfg.data_dir / "spool")
        self.holder = ModelHolder()
        self.updater = UpdateService(cfg, self.publisher, self.holder, self.stats)
        self.telemetry = TelemetryService(cfg, self.device_id, self.stats, self.publisher)
        self.builder = FrameBuilder(self.device_id, self.boot_id, cfg.source.name, cfg.model.top_k,
                                    cfg.sampler.jpeg_quality, cfg.sampler.max_image_side)
        self.sampled = 0
        self.published = 0
        self.pipeline: Optional[Pipeline] = None

    def status(self, state: str) -> Any:
        model = self.holder.get()
        msg = kestrel_pb2.Status(device_id=self.device_id, state=state, time_ms=int(time.time() * 1000),
                                 group=self.cfg.device.group, software_version=__version__)
        if model is not None:
            msg.model.CopyFrom(model.ref)
        try:
            msg.versions.CopyFrom(self.updater.version_manifest())
        except Exception:  # the status must go out even if the updater is confused
            log.exception("version manifest unavailable")
        return msg

    def sink(self, s: SampledFrame) -> None:
        self.sampled += 1
        self.publisher.publish_frame(self.builder.build(s))
        self.published += 1

    def on_model_change(self, model: Any) -> None:
        self.stats.set_model(model.ref)

    def run(self) -> int:
        cfg = self.cfg
        model = self.updater.boot_model() or initial_model(cfg)
        self.holder.swap(model)
        self.stats.set_model(model.ref)
        log.info("device %s boot %s: model %s v%d (%s, %s) on source %s (%s)", self.device_id, self.boot_id,
                 model.ref.name, model.ref.version, model.ref.sha256[:12], getattr(model, "runtime", "?"),
                 cfg.source.name, cfg.source.kind)
        source = open_source(cfg.source)
        self.publisher.set_status_provider(self.status)
        self.publisher.start()
        try:
            self.telemetry.start()
            self.updater.start()
            sampler = Sampler(cfg.sampler)
            self.pipeline = Pipeline(source, self.holder, sampler, self.sink, cfg.pipeline, self.stats,
                                     observers=[self._observe])
            self.pipeline.start()
            while not self.stop_requested.is_set() and not self.pipeline.done:
                self.stop_requested.wait(POLL_S)
            why = "signal" if self.stop_requested.is_set() else "source ended"
            log.info("stopping (%s): draining the pipeline", why)
            if not self.pipeline.stop(PIPELINE_DRAIN_S):
                log.warning("pipeline did not drain within %.0fs", PIPELINE_DRAIN_S)
        finally:
            source.request_stop()
            for name, fn in (("updater", self.updater.stop), ("telemetry", self.telemetry.stop)):
                try:
                    fn()
                except Exception:
                    log.exception("%s did not stop cleanly", name)
            self.publisher.stop(flush_timeout_s=FLUSH_TIMEOUT_S)
            current = self.holder.get()
            if current is not None:
                current.close()
        self._summary(sampler)
        return 0

    def _observe(self, result: Any) -> None:
        self.updater.observe(result)
        model = self.holder.get()
        if model is not None and result.model_ref is not model.ref:
            self.stats.set_model(model.ref)

    def _summary(self, sampler: Sampler) -> None:
        p = self.pipeline
        spool_bytes, spool_frames, evictions = self.publisher.spool_stats()
        summary = {"captured": p.captured if p else 0, "processed": p.processed if p else 0,
                   "dropped": p.dropped if p else 0, "corrupt": p.source.corrupt if p else 0,
                   "errors": p.errors if p else 0, "sampled": self.sampled, "spooled": self.published,
                   "spool_frames": spool_frames, "spool_bytes": spool_bytes, "spool_evictions": evictions,
                   "sampler": sampler.counters()}
        log.info("summary %s", json.dumps(summary, sort_keys=True))


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    logging.getLogger().setLevel(cfg.device.log_level.upper())
    quiet_opencv(cfg.device.log_level.upper() != "DEBUG")
    problems = check_plausible(cfg)
    if args.check_config:
        if problems:
            raise ConfigError(f"{args.config}: " + "; ".join(problems))
        print(f"{args.config}: OK (device {cfg.device.resolved_id}, source {cfg.source.kind}, "
              f"model {cfg.model.path or 'active slot'})")
        return 0
    if problems:
        raise ConfigError(f"{args.config}: " + "; ".join(problems))
    daemon = Daemon(cfg)

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        del frame
        log.info("received %s", signal.Signals(signum).name)
        daemon.stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = daemon.run()
    sys.stdout.flush()
    return code
