"""``kestrel-edge run``: camera -> model -> sampled frames over MQTT, until SIGTERM or the file ends.

Wiring: config -> Stats, Publisher (durable spool + MQTT), TelemetryService, ModelHolder,
UpdateService (boot model, desired state, trial watch), source, Sampler, Pipeline. Sampled frames
go through a bounded hand-off (edge.framesink.SinkWorker) to a thread that turns them into
``kestrel_pb2.Frame`` messages (JPEG image, top-k, reasons) and hands them to the publisher, which
spools them (fsync) before sending. SIGTERM/SIGINT: stop capture, drain queued frames through
inference, spool every sampled frame, flush the publisher, exit 0. A file source that ends does
the same. A second signal skips the inference drain and the flush (every frame already sampled is
still spooled). A capture failure ends the run with exit code 1 (systemd restarts the daemon).

The sampler's confidence threshold follows the running model: unless ``[sampler]
confidence_threshold`` is set, every model swap (boot, update, rollback) applies the bundle's
``default_threshold`` (0.6 for a bare .tflite).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable, List, Optional

import cv2

from edge import __version__, config
from edge.errors import ArtifactError, ConfigError, KestrelError
from edge.framesink import FrameBuilder, SinkWorker
from edge.pipeline import ModelHolder, Pipeline
from edge.runtime import Model, load_labels, load_model
from edge.sampler import Sampler
from edge.sources import open_source
from proto import kestrel_pb2

log = logging.getLogger("edge.daemon")

FLUSH_TIMEOUT_S = 5.0      # publisher flush on shutdown
PIPELINE_DRAIN_S = 30.0    # longest wait for queued frames to go through inference on shutdown
SINK_DRAIN_S = 60.0        # longest wait for sampled frames to be encoded and spooled on shutdown
RATE_STATE_FILE = "sampler-sent.log"  # in data_dir: the rate limits' memory across restarts
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
    problem = _data_dir_problem(cfg.data_dir)
    if problem:
        problems.append(problem)
    q = cfg.mqtt
    if q.host:
        files = [("password_file", q.password_file)]
        if q.tls:
            files += [("ca_file", q.ca_file), ("cert_file", q.cert_file), ("key_file", q.key_file)]
        for key, path in files:
            if path and not _readable(path):
                problems.append(f"mqtt.{key}: {path} does not exist or is not readable")
        if (q.ca_file or q.cert_file or q.key_file) and not q.tls:
            problems.append("mqtt: ca_file/cert_file/key_file are set but tls = false")
    return problems


def _readable(path: str) -> bool:
    return Path(path).is_file() and os.access(path, os.R_OK)


def _data_dir_problem(data_dir: Path) -> Optional[str]:
    """None when ``data_dir`` exists (or can be created) and is a writable directory."""
    d = data_dir
    while not d.exists() and d != d.parent:
        d = d.parent  # the first existing ancestor decides whether it can be created
    if not d.is_dir():
        return f"device.data_dir: {data_dir}: {d} is not a directory"
    if not os.access(str(d), os.W_OK | os.X_OK):
        what = "is not writable" if d == data_dir else f"cannot be created ({d} is not writable)"
        return f"device.data_dir: {data_dir} {what}; run as a user who may write there or change it"
    return None


def check_model_loads(cfg: config.EdgeConfig) -> List[str]:
    """--check-config: load the configured .tflite (and labels) once, as the daemon would."""
    m = cfg.model
    if not m.path or is_bundle_path(m.path) or not Path(m.path).is_file():
        return []  # bundles are verified by the updater at start; a missing path is reported already
    try:
        initial_model(cfg).close()
    except KestrelError as exc:
        return [f"model.path: {exc}"]
    return []


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
    """The configured fallback model: ``model.path``, a bare .tflite (the callers check that it is set
    and not a bundle; bundles are installed through the updater)."""
    m = cfg.model
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
        self.publisher = Publisher(cfg, self.device_id, cfg.data_dir / "spool")
        self.sampler = Sampler(cfg.sampler, state_path=cfg.data_dir / RATE_STATE_FILE)
        self.holder: ModelHolder = FollowingHolder(self._on_model_swapped)
        self.updater = UpdateService(cfg, self.publisher, self.holder, self.stats)
        self.telemetry = TelemetryService(cfg, self.device_id, self.stats, self.publisher)
        self.builder = FrameBuilder(self.device_id, self.boot_id, cfg.source.name, cfg.model.top_k,
                                    cfg.sampler.jpeg_quality, cfg.sampler.max_image_side,
                                    max_bytes=cfg.mqtt.max_payload_bytes)
        self.sink_worker = SinkWorker(self.builder, self.publisher.publish_frame, cfg.pipeline.sink_queue_size)
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

    def _close_sink(self) -> None:
        if not self.sink_worker.close(SINK_DRAIN_S):
            log.error("sampled frames were not all spooled within %.0fs (%d waiting)", SINK_DRAIN_S,
                      self.sink_worker.pending)

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
        self.stats.set_model(model.ref)  # telemetry names the running model (set here, not per frame)
        default = model_default_threshold(model, self.updater.updater.slots)
        self.sampler.model_changed()
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
        from edge.bundle import read_bounded

        try:
            data = read_bounded(path, int(self.cfg.update.max_bundle_bytes))  # size checked first
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
        path = cfg.model.path
        model = self.updater.boot_model()
        if model is not None:
            if path and is_bundle_path(path):
                log.info("model.path %s ignored: a model is installed (update it with `kestrel-edge install`)",
                         path)
        elif not path:
            if not self.can_wait_for_hub():
                raise ConfigError("no model: nothing is installed in data_dir, model.path is empty and no hub "
                                  "can deploy one ([mqtt] host and [update] hub_grpc unset, or [update] "
                                  "enabled = false); set model.path or run `kestrel-edge install BUNDLE`")
            log.info("no model installed yet: waiting for the hub to deploy one (kestrel-hub deploy NAME "
                     "VERSION --group %s) or for `kestrel-edge install BUNDLE`", cfg.device.group)
            return None
        elif is_bundle_path(path):
            return self._install_configured_bundle(path)
        elif not cfg.update.allow_unsigned_factory:
            raise ConfigError(f"no signed model is installed and model.path {path} is an unsigned .tflite, "
                              "which [update] allow_unsigned_factory = false forbids; install a signed bundle "
                              "(kestrel-edge install, or model.path = a .kbundle)")
        else:
            log.warning("no signed model installed: running the UNSIGNED factory model %s (model.path; see "
                        "docs/threat-model.md)", path)
            model = initial_model(cfg)
        self.holder.swap(model)
        return model

    def can_wait_for_hub(self) -> bool:
        """A device with no model may wait for its first one when the hub can deploy to it."""
        return bool(self.cfg.update.enabled and self.cfg.update.hub_grpc and self.cfg.mqtt.host)

    def _wait_for_first_model(self) -> Any:
        """Block until the updater installed a first model (hot swap into the holder) or a stop request."""
        while not self.stop_requested.is_set():
            model = self.holder.get()
            if model is not None:
                return model
            self.stop_requested.wait(POLL_S)
        return None

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
        model = self._boot()  # None: no model yet, the hub will deploy the first one
        source = None
        self.publisher.set_status_provider(self.status)
        self.publisher.start()
        try:
            self.telemetry.start()
            self.updater.start()
            if model is None:
                model = self._wait_for_first_model()
                if model is None:
                    log.info("stopping before a first model arrived")
                    return 0
            log.info("device %s boot %s: model %s v%d (%s, %s) on source %s (%s)", self.device_id, self.boot_id,
                     model.ref.name, model.ref.version, model.ref.sha256[:12], getattr(model, "runtime", "?"),
                     cfg.source.name, cfg.source.kind)
            source = open_source(cfg.source)
            self.sink_worker.start()
            # the inference thread hands sampled frames over (waiting while the sink's queue is full)
            self.pipeline = Pipeline(source, self.holder, self.sampler, self.sink_worker.put, cfg.pipeline,
                                     self.stats, observers=[self.updater.observe])
            pipe = self.pipeline
            self.updater.attach_pipeline(lambda: (pipe.captured, pipe.processed, pipe.done),
                                         on_stall=lambda why: self.request_stop("a hung trial model"))
            self.pipeline.start()
            while not self.stop_requested.is_set() and not self.pipeline.done:
                self.pipeline.wait(POLL_S)  # returns at once when the source ends; signals are seen per POLL_S
            why = "signal" if self.stop_requested.is_set() else "source ended"
            log.info("stopping (%s): draining the pipeline", why)
            self._wait_for_pipeline(self.pipeline)
            self._close_sink()
        finally:
            if source is not None:
                source.request_stop()
            self._close_sink()
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

    def run_seconds(self) -> float:
        """Pipeline start -> inference finished and the last sampled frame stored (0 before a run)."""
        p = self.pipeline
        if p is None or not p.finished_at:
            return 0.0
        return max(p.finished_at, self.sink_worker.last_done_at) - p.started_at

    def _summary(self, sampler: Sampler) -> None:
        p = self.pipeline
        spool_bytes, spool_frames, evictions = self.publisher.spool_stats()
        sink = self.sink_worker
        pub = self.publisher
        summary = {"captured": p.captured if p else 0, "processed": p.processed if p else 0,
                   "dropped": p.dropped if p else 0, "corrupt": p.source.corrupt if p else 0,
                   "errors": p.errors if p else 0, "error_kinds": p.error_kinds if p else {},
                   "sink_errors": sink.errors, "sampled": self.stats.sampled, "spooled": sink.spooled,
                   "refused": sink.refused,
                   "reencoded": self.builder.reencoded, "spool_write_failed": pub.spool_write_failed,
                   "confidence_threshold": sampler.confidence_threshold,
                   "spool_frames": spool_frames, "spool_bytes": spool_bytes, "spool_evictions": evictions,
                   "dead_letters": pub.dead_letters, "frames_acked": pub.frames_acked,
                   "run_s": round(self.run_seconds(), 3), "sampler": sampler.counters()}
        log.info("summary %s", json.dumps(summary, sort_keys=True))


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    logging.getLogger().setLevel(cfg.device.log_level.upper())
    quiet_opencv(cfg.device.log_level.upper() != "DEBUG")
    problems = check_plausible(cfg)
    if args.check_config:
        if not problems:
            problems = check_model_loads(cfg)
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
