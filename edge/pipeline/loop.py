"""Capture -> bounded queue -> inference -> sampler -> sink, on two threads.

The capture thread reads the source and puts frames in a bounded queue: for live sources the
oldest queued frame is dropped when it is full (the model always sees fresh frames), for files
the capture thread waits (nothing is skipped); ``PipelineConfig.drop_policy`` overrides that.
The inference thread takes the model from the :class:`ModelHolder` for every frame (so a swap
takes effect on the next frame and never drops one), runs it, asks the sampler, tells every
observer about the :class:`InferenceResult` and hands frames to send to ``sink``.

``stop()`` stops capture, lets the inference thread drain what is queued, then returns.

A frame that makes anything on the inference thread fail (the model, preprocessing, the sampler,
an unexpected OpenCV error), and a model answer that is not a number (NaN anywhere, or an infinite
top score), is counted in ``errors`` (by kind in ``error_kinds``) and becomes an InferenceResult
with ``error`` set: the observers (the updater's trial watch) see every failure, and the loop goes
on with the next frame. Every frame taken from the queue counts in ``processed``. The first failure
of each kind is logged (unexpected ones with their traceback), later ones only counted, so a bad
stream cannot flood the log. ``started_at``/``finished_at`` (monotonic) time the run;
``capture_cpu_s``/``inference_cpu_s`` are the CPU seconds each thread used (benchmarks).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from edge.config import PipelineConfig
from edge.errors import ModelError
from edge.logonce import OncePerKind
from edge.pipeline.sampler import Sampler
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
    top: Optional[float] = None  # the top score (None with an error or no scores)

    def __post_init__(self) -> None:
        if self.top is None and self.scores is not None and self.error is None:  # built outside the pipeline
            self.top = top_score(self.scores)


NON_FINITE = "non-finite scores (NaN or infinity)"


def top_score(scores: np.ndarray) -> float:
    """The highest score; NaN when any score is NaN (argmax picks the first NaN, and costs a fraction
    of max()), +inf when one is +inf."""
    s = scores.reshape(-1)
    return float(s[s.argmax()])


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
        self.capture_error: Optional[BaseException] = None
        self._last_depth = -1
        self._once = OncePerKind(log)  # errors by kind; the first of each kind logged
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
                self._process(*item)
        finally:
            self.inference_cpu_s = time.thread_time() - cpu0
            self.finished_at = time.monotonic()
            self._done.set()

    def _failed(self, seq: int, kind: str, error: str, exc: Optional[BaseException] = None) -> None:
        """Count a frame that failed; log the first of each kind (unexpected ones with the traceback)."""
        self.errors += 1
        if exc is not None:
            self._once.log(kind, logging.ERROR, "frame %d could not be processed (%s); skipping it and going on "
                           "(later %s errors are counted, not logged)", seq, error, kind, exc_info=exc)
        else:
            self._once.log(kind, logging.WARNING, "frame %d: %s (later %s errors are counted, not logged)", seq,
                           error, kind)

    @property
    def error_kinds(self) -> Dict[str, int]:
        """Per-frame failures by kind (``inference``, ``non_finite_scores``, ``sink``, else the exception type)."""
        return self._once.counts()

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
        self.processed += 1
        model: Any = None
        latency = 0.0
        result: Optional[InferenceResult] = None
        try:
            model, scores, error, latency = self._infer(frame)
            if scores is not None:
                top = top_score(scores)
                if math.isfinite(top):
                    decision = self.sampler.decide(scores, frame, thumbnail=getattr(model, "last_resized", None),
                                                   top=top)
                    result = InferenceResult(seq, model.ref, scores, latency, None, decision.low_confidence,
                                             decision.reasons, capture_time, decision.send, decision.skipped, top)
                else:  # NaN would look confident to the sampler: an error, never a frame
                    error = NON_FINITE
                    self._failed(seq, "non_finite_scores", f"the model returned {NON_FINITE}")
            else:
                self._failed(seq, "inference", f"inference error: {error}")
        except Exception as exc:  # one bad frame must not end the run
            error = f"{type(exc).__name__}: {exc}"
            self._failed(seq, type(exc).__name__, error, exc)
        if result is None:
            if model is None:
                model = self.holder.get()  # failed before inference: the model in use
            result = InferenceResult(seq, getattr(model, "ref", None), None, latency, error, False, [],
                                     capture_time)
        else:
            self.stats.inference(latency, result.top, result.low_confidence)
        for fn in self.observers:
            try:
                fn(result)
            except Exception:
                log.exception("inference observer %r failed", fn)
        if result.sampled and result.scores is not None:
            self.stats.frame_sampled()
            try:
                self.sink(SampledFrame(seq, capture_time, frame, result.scores, list(model.labels),
                                       result.model_ref, list(result.reasons)))
            except Exception as exc:
                self._failed(seq, "sink", f"could not hand the sampled frame on ({type(exc).__name__}: {exc})",
                             exc)
