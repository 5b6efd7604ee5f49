"""``kestrel-edge run``: camera -> model -> sampled frames over MQTT, until SIGTERM or the file ends.

Wiring: config -> Stats, Publisher (durable spool + MQTT), TelemetryService, ModelHolder,
UpdateService (boot model, desired state, trial watch), source, Sampler, Pipeline. Sampled frames
become ``kestrel_pb2.Frame`` messages (JPEG image, top-k, reasons) handed to the publisher, which
spools them (fsync) before sending. SIGTERM/SIGINT: stop capture, drain queued frames through
inference, flush the publisher, exit 0. A file source that ends does the same. A second signal
skips the drain and the flush (sampled frames are already in the spool). A capture failure ends
the run with exit code 1 (systemd restarts the daemon).

The sampler's confidence threshold follows the running model: unless ``[sampler]
confidence_threshold`` is set, every model swap (boot, update, rollback) applies the bundle's
``default_threshold`` (0.6 for a bare .tflite).
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
from typing import Any, Callable, List, Optional, cast

import cv2
import numpy as np

from edge import __version__, config
from edge.errors import ArtifactError, ConfigError, KestrelError
from edge.pipeline import ModelHolder, Pipeline, SampledFrame
from edge.runtime import Model, load_labels, load_model
from edge.sampler import Sampler
from edge.sources import open_source
from proto import kestrel_pb2

log = logging.getLogger("edge.daemon")

FLUSH_TIMEOUT_S = 5.0      # publisher flush on shutdown
PIPELINE_DRAIN_S = 30.0    # longest wait for queued frames to go through inference on shutdown
POLL_S = 0.2               # main-thread wake-up interval while running
EXIT_CAPTURE_FAILED = 1    # the source failed (not a clean end): let the service manager restart us


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
    if is_bundle_path(m.path):
        raise ConfigError(f"model.path {m.path} is a bundle; it is installed through the updater")
    labels = load_labels(m.labels) if m.labels else None
    return load_model(m.path, labels=labels, runtime=m.runtime, threads=m.threads, name=Path(m.path).stem,
                      color_order=m.color_order, normalization=m.normalization, resize=m.resize)


def is_bundle_path(path: str) -> bool:
    return path.endswith(".kbundle")


def model_default_threshold(model: Any, slots: Any) -> Optional[float]:
    """The ``default_threshold`` of the bundle ``model`` came from (None for a bare .tflite).

    Read from ``model.default_threshold`` when the loader set it, else from the record of the slot
    holding exactly this model (same name, version and model sha256).
    """
    value = getattr(model, "default_threshold", None)
    if value is None and slots is not None:
        ref = model.ref
        for name in ("a", "b"):
            slot = slots.slot(name)
            if (slot is not None and slot.model_sha256 == ref.sha256 and slot.model_name == ref.name
                    and slot.version == int(ref.version)):
                value = slot.record.get("default_threshold")
                break
    return None if value is None else float(value)


class FollowingHolder(ModelHolder):
    """A ModelHolder that calls ``on_swap(model)`` after every swap (boot, update, rollback)."""

    def __init__(self, on_swap: Callable[[Any], None]) -> None:
        super().__init__()
        self._on_swap = on_swap

    def swap(self, model: Any) -> Any:
        previous = super().swap(model)
        if model is not None:
            try:
                self._on_swap(model)
            except Exception:  # a swap must never fail half-way because of a listener
                log.exception("model swap listener failed")
        return previous


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
        self.hurry = threading.Event()  # a second signal: skip the drain and the flush
        self.signals = 0
        self.stats = Stats()
        self.sampler = Sampler(cfg.sampler)
        self.publisher = Publisher(cfg, self.device_id, cfg.data_dir / "spool")
        self.holder: ModelHolder = FollowingHolder(self._on_model_swapped)
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

    def request_stop(self, signame: str = "signal") -> None:
        """Signal handler body: the first request stops gracefully, the next ones skip the waiting."""
        self.signals += 1
        if self.signals == 1:
            log.info("received %s: stopping", signame)
        else:
            log.warning("received %s again: not waiting for queued frames or the broker "
                        "(sampled frames stay in the spool)", signame)
            self.hurry.set()
        self.stop_requested.set()

    def _on_model_swapped(self, model: Any) -> None:
        default = model_default_threshold(model, self.updater.updater.slots)
        before = self.sampler.confidence_threshold
        value = self.sampler.follow_model_default(default)
        if self.sampler.threshold_from_config:
            why = "[sampler] confidence_threshold"
        elif default is not None:
            why = f"default_threshold of {model.ref.name} v{model.ref.version}"
        else:
            why = "built-in default (the model has no bundle default)"
        if value != before or self.holder.swaps <= 1:
            log.info("confidence threshold %.3g (%s)", value, why)

    def _install_configured_bundle(self, path: str) -> Any:
        """No slot yet and model.path is a .kbundle: verify, stage, self-test and switch to it
        through the updater's normal install path; the result is committed at once (there is no
        previous model to roll back to). ConfigError (one line, exit 2) when it is refused."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"model.path {path}: cannot read the bundle: {exc.strerror or exc}") from exc
        try:
            installed = self.updater.install_bytes(data, source=f"model.path {Path(path).name}")
        except ArtifactError as exc:
            raise ConfigError(f"model.path {path}: {exc} (trusted keys: {self.cfg.trust_dir})") from exc
        except KestrelError as exc:
            raise ConfigError(f"model.path {path}: could not install it: {exc}") from exc
        model = self.holder.get()
        if not installed or model is None:
            raise ConfigError(f"model.path {path}: the bundle was not installed; "
                              "check `kestrel-edge status`")
        from edge.updater import state as st

        if self.updater.updater.state.state == st.TRIAL:
            self.updater.updater.commit("first model, installed from model.path (nothing to roll back to)")
            self.updater.health.end_trial()
        log.info("installed %s v%d from model.path %s into slot %s", model.ref.name, model.ref.version, path,
                 self.updater.updater.slots.active_name())
        return model

    def _boot(self) -> Any:
        cfg = self.cfg
        model = self.updater.boot_model()
        if model is not None:
            if cfg.model.path and is_bundle_path(cfg.model.path):
                log.info("model.path %s ignored: a model is installed (update it with `kestrel-edge install`)",
                         cfg.model.path)
            self.holder.swap(model)
            return model
        if cfg.model.path and is_bundle_path(cfg.model.path):
            return self._install_configured_bundle(cfg.model.path)
        model = initial_model(cfg)
        self.holder.swap(model)
        return model

    def _wait_for_pipeline(self, pipeline: Pipeline) -> None:
        deadline = time.monotonic() + PIPELINE_DRAIN_S
        pipeline.stop(0)
        while not pipeline.done and not self.hurry.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("pipeline did not drain within %.0fs", PIPELINE_DRAIN_S)
                return
            pipeline.wait(min(left, POLL_S))
        if not pipeline.done:
            log.warning("not draining the pipeline: %d captured frames were not inferred",
                        pipeline.captured - pipeline.processed)

    def run(self) -> int:
        cfg = self.cfg
        model = self._boot()
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
            self.pipeline = Pipeline(source, self.holder, self.sampler, self.sink, cfg.pipeline, self.stats,
                                     observers=[self._observe])
            self.pipeline.start()
            while not self.stop_requested.is_set() and not self.pipeline.done:
                self.stop_requested.wait(POLL_S)
            why = "signal" if self.stop_requested.is_set() else "source ended"
            log.info("stopping (%s): draining the pipeline", why)
            self._wait_for_pipeline(self.pipeline)
        finally:
            source.request_stop()
            for name, fn in (("updater", self.updater.stop), ("telemetry", self.telemetry.stop)):
                try:
                    fn()
                except Exception:
                    log.exception("%s did not stop cleanly", name)
            self.publisher.stop(flush_timeout_s=0.0 if self.hurry.is_set() else FLUSH_TIMEOUT_S)
            if self.pipeline is None or self.pipeline.done:  # else the inference thread may still use it
                current = self.holder.get()
                if current is not None:
                    current.close()
        self._summary(self.sampler)
        failure = self.pipeline.capture_error if self.pipeline is not None else None
        if failure is not None:
            log.error("the source failed: %s; exiting with code %d", failure, EXIT_CAPTURE_FAILED)
            return EXIT_CAPTURE_FAILED
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
                   "errors": p.errors if p else 0, "sink_errors": p.sink_errors if p else 0,
                   "sampled": self.sampled, "spooled": self.published,
                   "confidence_threshold": sampler.confidence_threshold,
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
        daemon.request_stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = daemon.run()
    sys.stdout.flush()
    return code
