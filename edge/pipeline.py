"""Capture -> bounded queue -> inference -> sampler -> sink, on two threads.

The capture thread reads the source and puts frames in a bounded queue: for live sources the
oldest queued frame is dropped when it is full (the model always sees fresh frames), for files
the capture thread waits (nothing is skipped); ``PipelineConfig.drop_policy`` overrides that.
The inference thread takes the model from the :class:`ModelHolder` for every frame (so a swap
takes effect on the next frame and never drops one), runs it, asks the sampler, tells every
observer about the :class:`InferenceResult` and hands frames to send to ``sink``.

``stop()`` stops capture, lets the inference thread drain what is queued, then returns.

A frame that makes anything on the inference thread fail (the model, preprocessing, the sampler,
an unexpected OpenCV error) is counted in ``errors`` and skipped: the loop goes on with the next
frame. The first failure of each kind is logged with its traceback, later ones only counted, so a
bad stream cannot flood the log. ``started_at``/``finished_at`` (monotonic) time the run;
``capture_cpu_s``/``inference_cpu_s`` are the CPU seconds each thread used (benchmarks).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from edge.config import PipelineConfig
from edge.errors import ModelError
from edge.sampler import Sampler
from edge.sources import FrameSource

log = logging.getLogger(__name__)


class ModelHolder:
    """The model in use; thread-safe ``get``/``swap``. The inference loop calls ``get`` per frame."""

    def __init__(self, model: Any = None) -> None:
        self._lock = threading.Lock()
        self._model = model
        self.swaps = 0

    def get(self) -> Any:
        with self._lock:
            return self._model

    def swap(self, model: Any) -> Any:
        """Install ``model`` for the next frame; return the previous one (the caller closes it)."""
        with self._lock:
            previous, self._model = self._model, model
            self.swaps += 1
        return previous


@dataclasses.dataclass
class InferenceResult:
    seq: int
    model_ref: Any
    scores: Optional[np.ndarray]
    latency_s: float
    error: Optional[str]
    low_confidence: bool
    reasons: List[int]
    capture_time: float = 0.0
    sampled: bool = False
    skipped: str = ""  # why a low-confidence frame was not sent: rate_limited or duplicate


@dataclasses.dataclass
class SampledFrame:
    """A frame the sampler chose, handed to the sink."""

    seq: int
    capture_time: float
    bgr: np.ndarray
    scores: np.ndarray
    labels: List[str]
    model_ref: Any
    reasons: List[int]


def _noop(*a: Any, **k: Any) -> None:
    return None


class _NullStats:
    """Accepts any stats call and does nothing (the method is cached on first use: no per-frame lookup cost)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        setattr(self, name, _noop)
        return _noop


_END = object()


class Pipeline:
    def __init__(self, source: FrameSource, holder: ModelHolder, sampler: Sampler,
                 sink: Callable[[SampledFrame], None], cfg: Optional[PipelineConfig] = None,
                 stats: Any = None,
                 observers: Optional[List[Callable[[InferenceResult], None]]] = None) -> None:
        self.source = source
        self.holder = holder
        self.sampler = sampler
        self.sink = sink
        self.cfg = cfg or PipelineConfig()
        self.stats = stats if stats is not None else _NullStats()
        self.observers: List[Callable[[InferenceResult], None]] = list(observers or [])
        policy = self.cfg.drop_policy
        self.drop_oldest = source.live if policy == "auto" else policy == "drop_oldest"
        self._q: queue.Queue[Any] = queue.Queue(maxsize=self.cfg.queue_size)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._threads: List[threading.Thread] = []
        self.captured = 0
        self.dropped = 0
        self.processed = 0
        self.errors = 0
        self.sink_errors = 0
        self.capture_error: Optional[BaseException] = None
        self._last_depth = -1
        self._error_kinds: Dict[str, int] = {}
        self.started_at = 0.0
        self.finished_at = 0.0
        self.capture_cpu_s = 0.0
        self.inference_cpu_s = 0.0

    def add_observer(self, fn: Callable[[InferenceResult], None]) -> None:
        self.observers.append(fn)

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> Pipeline:
        self.started_at = time.monotonic()
        self._threads = [threading.Thread(target=self._capture_loop, name="capture", daemon=True),
                         threading.Thread(target=self._inference_loop, name="inference", daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop capture, drain queued frames through inference; True when everything finished."""
        self._stop.set()
        self.source.request_stop()
        return self.wait(timeout)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the pipeline to finish (source ended or stopped and drained)."""
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def run(self) -> None:
        self.start()
        self.wait()

    # --- threads ---------------------------------------------------------------------------
    def _capture_loop(self) -> None:
        cpu0 = time.thread_time()
        corrupt_seen = 0
        source, stats, stop = self.source, self.stats, self._stop
        try:
            while not stop.is_set():
                ok, frame, t = source.read()
                while corrupt_seen < source.corrupt:
                    corrupt_seen += 1
                    stats.frame_corrupt()
                if not ok or frame is None:
                    break
                self.captured += 1
                stats.frame_captured()
                self._put((self.captured, t, frame))
        except BaseException as exc:  # a source failure must still end the pipeline cleanly
            self.capture_error = exc
            log.error("capture stopped: %s", exc)
        finally:
            self.capture_cpu_s = time.thread_time() - cpu0
            try:
                self.source.close()
            finally:
                self._q.put(_END)  # blocking: the inference thread is consuming

    def _put(self, item: Any) -> None:
        if not self.drop_oldest:
            while not self._stop.is_set():
                try:
                    self._q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            else:
                # stopping while the queue is full: block until there is room so the frame is not lost
                self._q.put(item)
        else:
            while True:
                try:
                    self._q.put_nowait(item)
                    break
                except queue.Full:
                    try:
                        self._q.get_nowait()
                        self.dropped += 1
                        self.stats.frame_dropped()
                    except queue.Empty:
                        pass
        self._depth(self._q.qsize())

    def _depth(self, depth: int) -> None:
        """Report the queue depth to stats only when it changed (it rarely does in steady state)."""
        if depth != self._last_depth:
            self._last_depth = depth
            self.stats.set_queue_depth(depth)

    def _inference_loop(self) -> None:
        cpu0 = time.thread_time()
        q = self._q
        try:
            while True:
                item = q.get()
                if item is _END:
                    break
                self._depth(q.qsize())
                try:
                    self._process(*item)
                except Exception as exc:  # one bad frame must not end the run
                    self._unexpected(item[0], exc)
        finally:
            self.inference_cpu_s = time.thread_time() - cpu0
            self.finished_at = time.monotonic()
            self._done.set()

    def _unexpected(self, seq: int, exc: Exception) -> None:
        self.errors += 1
        kind = type(exc).__name__
        seen = self._error_kinds.get(kind, 0)
        self._error_kinds[kind] = seen + 1
        if not seen:
            log.error("frame %d could not be processed (%s: %s); skipping it and going on (later %s "
                      "errors are counted, not logged)", seq, kind, exc, kind, exc_info=exc)
        else:
            log.debug("frame %d could not be processed: %s: %s", seq, kind, exc)

    @property
    def error_kinds(self) -> Dict[str, int]:
        """Unexpected per-frame failures by exception type."""
        return dict(self._error_kinds)

    def _infer(self, frame: np.ndarray) -> tuple[Any, Optional[np.ndarray], Optional[str], float]:
        model = self.holder.get()
        for attempt in range(2):
            t0 = time.perf_counter()
            try:
                if model is None:
                    raise ModelError("no model loaded")
                scores = model.infer(frame)
                return model, scores, None, time.perf_counter() - t0
            except ModelError as exc:
                current = self.holder.get()
                if attempt == 0 and current is not model:
                    model = current  # swapped (and maybe closed) under us: use the new one
                    continue
                return model, None, str(exc), time.perf_counter() - t0
        raise AssertionError("unreachable")  # pragma: no cover

    def _process(self, seq: int, capture_time: float, frame: np.ndarray) -> None:
        model, scores, error, latency = self._infer(frame)
        ref = getattr(model, "ref", None)
        self.processed += 1
        if error is not None:
            self.errors += 1
            seen = self._error_kinds.get("inference", 0)
            self._error_kinds["inference"] = seen + 1
            log.log(logging.WARNING if not seen else logging.DEBUG, "inference error on frame %d: %s%s", seq,
                    error, " (later inference errors are counted, not logged)" if not seen else "")
            result = InferenceResult(seq, ref, None, latency, error, False, [], capture_time)
        else:
            self.stats.inference(latency)
            assert scores is not None
            decision = self.sampler.decide(scores, frame, thumbnail=getattr(model, "last_resized", None))
            result = InferenceResult(seq, ref, scores, latency, None, decision.low_confidence,
                                     list(decision.reasons), capture_time, decision.send, decision.skipped)
        for fn in self.observers:
            try:
                fn(result)
            except Exception:
                log.exception("inference observer %r failed", fn)
        if result.sampled and scores is not None:
            self.stats.frame_sampled()
            try:
                self.sink(SampledFrame(seq, capture_time, frame, scores, list(model.labels), ref,
                                       list(result.reasons)))
            except Exception:
                self.sink_errors += 1
                log.exception("could not hand sampled frame %d on", seq)
