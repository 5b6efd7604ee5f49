"""``kestrel-edge run``: camera -> model -> sampled frames over MQTT, until SIGTERM or the file ends.

Wiring: config -> Stats, Publisher (durable spool + MQTT), TelemetryService, ModelHolder,
UpdateService (boot model, desired state, trial watch), source, Sampler, Pipeline. Sampled frames
go through a bounded hand-off (edge.uplink.sink.SinkWorker) to a thread that turns them into
``kestrel_pb2.Frame`` messages (JPEG image, top-k, reasons) and hands them to the publisher, which
spools them (fsync) before sending. SIGTERM/SIGINT: stop capture, drain queued frames through
inference, spool every sampled frame, flush the publisher, exit 0. A file source that ends does
the same. A second signal skips the inference drain and the flush (every frame already sampled is
still spooled). A capture failure ends the run with exit code 1 (systemd restarts the daemon).

Several cameras (``[[sources]]``): one source per capture thread, one interpreter for all of them
(edge.pipeline.loop schedules them round-robin); every frame message, metric and summary counter names its
source. A live source that fails reconnects on its own thread while the others go on; a source that
ends or fails (an exception in its capture) stops alone, and the run ends when every source has ended
(exit 1 if any of them failed).

The sampler's confidence threshold follows the running model: unless ``[sampler]
confidence_threshold`` is set, every model swap (boot, update, rollback) applies the bundle's
``default_threshold`` (0.6 for a bare .tflite). The threshold in force goes out in every Status
(``confidence_threshold``), so the hub's fleet view shows which one each device runs.

The model to start on is chosen in edge.boot; the config checks behind ``--check-config`` are in
edge.configcheck. Under systemd (``Type=notify``) the daemon says READY once its pipeline runs (or once
it waits for a first model), pings the watchdog only while frames flow, and says STOPPING on shutdown
(edge.telemetry.watchdog).
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from edge import __version__, config
from edge.boot import FollowingHolder, boot, model_default_threshold, wait_for_first_model
from edge.configcheck import check_model_loads, check_plausible, load_config, quiet_opencv
from edge.pipeline.loop import ModelHolder, Pipeline
from edge.pipeline.sampler import Sampler
from edge.sources import FrameSource, open_source
from edge.stopsignals import StopSignals
from edge.uplink.sink import FrameBuilder, SinkWorker
from proto import kestrel_pb2
from proto.clock import now_ms
from proto.errors import ConfigError

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


# --- the daemon ------------------------------------------------------------------------------------
class Daemon:
    def __init__(self, cfg: config.EdgeConfig) -> None:
        from edge.telemetry.service import Stats, TelemetryService
        from edge.telemetry.watchdog import ServiceNotifier
        from edge.updater.service import UpdateService
        from edge.uplink.publisher import Publisher

        self.cfg = cfg
        self.device_id = cfg.device.resolved_id
        self.boot_id = secrets.token_hex(4)
        self.stop_requested = threading.Event()
        self.hurry = threading.Event()  # a second signal: skip the drain and the flush
        self.signals = 0
        self._signals_lock = threading.Lock()
        self.stats = Stats()
        self.publisher = Publisher(cfg.mqtt, cfg.spool, self.device_id, cfg.device.group, cfg.data_dir / "spool")
        self.sampler = Sampler(cfg.sampler, state_path=cfg.data_dir / RATE_STATE_FILE)
        self.holder: ModelHolder = FollowingHolder(self._on_model_swapped)
        self.updater = UpdateService.from_config(cfg, self.publisher, self.holder, self.stats)
        self.telemetry = TelemetryService(cfg.telemetry, self.device_id, self.stats, self.publisher)
        self.builder = FrameBuilder(self.device_id, self.boot_id, cfg.camera_sources[0].name, cfg.model.top_k,
                                    cfg.sampler.jpeg_quality, cfg.sampler.max_image_side,
                                    max_bytes=cfg.mqtt.max_payload_bytes)
        self.sink_worker = SinkWorker(self.builder, self.publisher.publish_frame, cfg.pipeline.sink_queue_size)
        self.pipeline: Optional[Pipeline] = None
        self.notifier = ServiceNotifier()  # systemd Type=notify: READY, STATUS, WATCHDOG, STOPPING
        self._stopping_sent = False

    def _progress(self) -> Optional[Tuple[int, int]]:
        """What the watchdog compares between pings: frames captured and inferred; None (idle on purpose:
        starting, or waiting for a first model) while there is no pipeline."""
        p = self.pipeline
        return None if p is None else (p.captured, p.processed)

    def _notify_stopping(self, why: str) -> None:
        if not self._stopping_sent:
            self._stopping_sent = True
            self.notifier.stopping(f"stopping ({why})")

    def status(self, state: str) -> Any:
        model = self.holder.get()
        msg = kestrel_pb2.Status(device_id=self.device_id, state=state, time_ms=now_ms(),
                                 group=self.cfg.device.group, software_version=__version__,
                                 confidence_threshold=self.sampler.confidence_threshold)
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
        """A stop signal (from edge.stopsignals' thread, never inside the handler) or a hung trial model: the
        first request stops gracefully, the next ones skip the waiting."""
        with self._signals_lock:
            self.signals += 1
            first = self.signals == 1
        if first:
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
        self.notifier.start_watchdog(self._progress)  # idle while starting: TimeoutStartSec bounds the start
        try:
            return self._run()
        finally:
            self._notify_stopping("exiting")
            self.notifier.stop()

    def _run(self) -> int:
        cfg = self.cfg
        model = boot(cfg, self.updater, self.holder)  # None: no model yet, the hub will deploy the first one
        sources: List[FrameSource] = []
        self.publisher.set_status_provider(self.status)
        self.publisher.start()
        try:
            self.telemetry.start()
            self.updater.start()
            if model is None:
                self.notifier.ready(f"waiting for the hub to deploy a first model (group {cfg.device.group})")
                model = wait_for_first_model(self.holder, self.stop_requested, POLL_S)
                if model is None:
                    log.info("stopping before a first model arrived")
                    self._notify_stopping("signal before a first model arrived")
                    return 0
            cams = cfg.camera_sources
            where = ", ".join(f"{c.name} ({c.kind})" for c in cams)
            log.info("device %s boot %s: model %s v%d (%s, %s, %s threads) on source%s %s", self.device_id,
                     self.boot_id, model.ref.name, model.ref.version, model.ref.sha256[:12],
                     getattr(model, "runtime", "?"), getattr(model, "threads", "?"), "s" if len(cams) > 1 else "",
                     where)
            sources = open_sources(cams)
            self.sink_worker.start()
            # the inference thread hands sampled frames over (waiting while the sink's queue is full)
            self.pipeline = Pipeline(sources, self.holder, self.sampler, self.sink_worker.put, cfg.pipeline,
                                     self.stats, observers=[self.updater.observe])
            pipe = self.pipeline
            self.updater.attach_pipeline(lambda: (pipe.captured, pipe.processed, pipe.done),
                                         on_stall=lambda why: self.request_stop("a hung trial model"))
            self.pipeline.start()
            self.notifier.ready(f"running {model.ref.name} v{model.ref.version} on {where}")
            while not self.stop_requested.is_set() and not self.pipeline.done:
                self.pipeline.wait(POLL_S)  # returns at once when the source ends; signals are seen per POLL_S
            why = "signal" if self.stop_requested.is_set() else "source ended"
            self._notify_stopping(f"{why}: draining the pipeline")
            log.info("stopping (%s): draining the pipeline", why)
            self._wait_for_pipeline(self.pipeline)
            self._close_sink()
        finally:
            for src in sources:
                src.request_stop()
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
        failed = [lane for lane in self.pipeline.lanes if lane.capture_error is not None] if self.pipeline else []
        if failed:
            log.error("the source%s failed: %s; exiting with code %d", "s" if len(failed) > 1 else "",
                      "; ".join(f"{lane.name}: {lane.capture_error}" for lane in failed), EXIT_CAPTURE_FAILED)
            return EXIT_CAPTURE_FAILED
        return 0

    def run_seconds(self) -> float:
        """Pipeline start -> inference finished and the last sampled frame stored (0 before a run)."""
        p = self.pipeline
        if p is None or not p.finished_at:
            return 0.0
        return max(p.finished_at, self.sink_worker.last_done_at) - p.started_at

    def _per_source(self) -> Dict[str, Dict[str, int]]:
        """The summary's counters by source, with the frames each had sampled."""
        p = self.pipeline
        if p is None:
            return {}
        out = p.per_source()
        sampled = {s["name"]: s["frames_sampled"] for s in self.stats.snapshot()["sources"]}
        for name, counts in out.items():
            counts["sampled"] = int(sampled.get(name, 0))
        return out

    def _summary(self, sampler: Sampler) -> None:
        p = self.pipeline
        spool_bytes, spool_frames, evictions = self.publisher.spool_stats()
        sink = self.sink_worker
        pub = self.publisher
        summary = {"captured": p.captured if p else 0, "processed": p.processed if p else 0,
                   "dropped": p.dropped if p else 0, "corrupt": p.corrupt if p else 0,
                   "errors": p.errors if p else 0, "error_kinds": p.error_kinds if p else {},
                   "sink_errors": sink.errors, "sampled": self.stats.sampled, "spooled": sink.spooled,
                   "refused": sink.refused,
                   "reencoded": self.builder.reencoded, "spool_write_failed": pub.spool_write_failed,
                   "confidence_threshold": sampler.confidence_threshold,
                   "spool_frames": spool_frames, "spool_bytes": spool_bytes, "spool_evictions": evictions,
                   "dead_letters": pub.dead_letters, "frames_acked": pub.frames_acked,
                   "receipts": pub.receipts.received, "frames_receipted": pub.receipts.frames_receipted,
                   "frames_resent": pub.receipts.frames_resent, "refused_by_hub": pub.receipts.refused,
                   "hub_receipts": pub.receipts.hub_receipts,
                   "run_s": round(self.run_seconds(), 3), "sampler": sampler.counters(),
                   "sources": self._per_source()}
        log.info("summary %s", json.dumps(summary, sort_keys=True))


def open_sources(cams: List[config.SourceConfig]) -> List[FrameSource]:
    """Open every camera; when one cannot be opened (an unreadable file), close the ones already open."""
    opened: List[FrameSource] = []
    try:
        for cam in cams:
            opened.append(open_source(cam))
    except BaseException:
        for src in opened:
            src.close()
        raise
    return opened


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
        cams = ", ".join(f"{c.name} ({c.kind})" for c in cfg.camera_sources)
        print(f"{args.config}: OK (device {cfg.device.resolved_id}, source{'s' if len(cfg.sources) > 1 else ''} "
              f"{cams}, model {cfg.model.path or 'active slot'})")
        return 0
    if problems:
        raise ConfigError(f"{args.config}: " + "; ".join(problems))
    daemon = Daemon(cfg)
    # The handler only writes to a pipe; request_stop (Event.set, logging) runs on a thread of its own: an
    # Event.set() inside the handler can deadlock on the Event's lock (edge/stopsignals.py).
    stops = StopSignals(daemon.request_stop).install()
    try:
        code = daemon.run()
    finally:
        stops.close()
    sys.stdout.flush()
    return code
