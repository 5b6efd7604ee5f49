"""Capture -> bounded queue per source -> one inference thread -> sampler -> sink.

Every source (camera) has its own capture thread, which reads it and puts frames in the source's own
bounded queue (edge.pipeline.lanes): for live sources the oldest queued frame is dropped when it is
full (the model always sees fresh frames), for files the capture thread waits (nothing is skipped);
``PipelineConfig.drop_policy`` overrides that, and a source's own ``queue_size``/``drop_policy`` override
the pipeline's (several sources share ``queue_size``: :func:`source_queue_size`). The one inference
thread takes frames round-robin over the sources (a fast camera cannot starve a slow one), takes the
model from the :class:`ModelHolder` for every frame (so a swap takes effect on the next frame and never
drops one), runs it, asks the sampler, tells every observer about the :class:`InferenceResult` (which
names its source) and hands frames to send to ``sink``.
With ``max_batch`` > 1 and a model whose batch dimension can be resized, up to that many queued frames
(of different sources first) go through one invoke; each still becomes its own result.

With several sources, the capture threads of files (sources that are not live) run at a lower OS
priority (FILE_CAPTURE_NICENESS): they only need to keep ahead of the model, which must not wait for a
core while they decode; live cameras keep the normal priority (they must keep up with the camera).

Frame numbers (``seq``) count captures over every source of the run, so ``{device}-{boot}-{seq}`` is
unique per device. A source that ends (a file's end) or fails (an exception in capture:
``capture_error``, logged) stops only its own capture thread; the pipeline is done when every source
has ended and every queued frame went through inference.

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
import itertools
import logging
import math
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import numpy as np

from edge.config import PipelineConfig
from edge.errors import ModelError
from edge.logonce import OncePerKind
from edge.pipeline.lanes import FairQueue, Lane
from edge.pipeline.sampler import Sampler
from edge.sources import FrameSource
from edge.threadprio import lower_thread_priority

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
    source: str = ""  # the name of the camera the frame came from

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
    source: str = ""  # the camera's name (Frame.source)


def _noop(*a: Any, **k: Any) -> None:
    return None


class _NullStats:
    """Accepts any stats call and does nothing (the method is cached on first use: no per-frame lookup cost)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        setattr(self, name, _noop)
        return _noop


Item = Tuple[int, float, np.ndarray]  # (seq, capture time, BGR frame)
MIN_SOURCE_QUEUE = 2  # frames queued per source at least, when several share [pipeline] queue_size
# Added to the nice value of the capture threads of sources that are not live (files) when there are several
# sources (Linux): a file is read only as fast as the model takes its frames, so its decoding must not take
# the inference thread's core. Without it the kernel shares the cores equally between the one inference
# thread and every capture thread, and the model waits for a core a third of the time (bench_multicam).
FILE_CAPTURE_NICENESS = 10


def source_queue_size(queue_size: int, sources: int) -> int:
    """A source's share of ``[pipeline] queue_size`` (all of it for a single source): camera frames are
    megabytes each, and round-robin keeps the model fed from a couple of frames per source."""
    if sources <= 1:
        return queue_size
    return max(MIN_SOURCE_QUEUE, -(-queue_size // sources))


class Pipeline:
    def __init__(self, source: Union[FrameSource, Sequence[FrameSource]], holder: ModelHolder, sampler: Sampler,
                 sink: Callable[[SampledFrame], None], cfg: Optional[PipelineConfig] = None,
                 stats: Any = None,
                 observers: Optional[List[Callable[[InferenceResult], None]]] = None) -> None:
        """``source``: one source or several (each needs its own ``name``)."""
        self.sources: List[FrameSource] = (list(source) if isinstance(source, (list, tuple))
                                           else [cast(FrameSource, source)])
        if not self.sources:
            raise ValueError("a pipeline needs a source")
        self.holder = holder
        self.sampler = sampler
        self.sink = sink
        self.cfg = cfg or PipelineConfig()
        self.stats = stats if stats is not None else _NullStats()
        self.observers: List[Callable[[InferenceResult], None]] = list(observers or [])
        self._fq = FairQueue()
        for src in self.sources:
            own = getattr(src.cfg, "drop_policy", "")  # the source's own setting wins over [pipeline]'s
            policy = own or self.cfg.drop_policy
            drop_oldest = src.live if policy == "auto" else policy == "drop_oldest"
            size = getattr(src.cfg, "queue_size", 0) or source_queue_size(self.cfg.queue_size, len(self.sources))
            lane = self._fq.add(src.name, src, size, drop_oldest)
            self.stats.watch_source(lane.name, lane.health)
        self.lanes: List[Lane] = self._fq.lanes
        self._seq = itertools.count(1)  # frame numbers over every source (next() is atomic)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._threads: List[threading.Thread] = []
        self.processed = 0
        self.errors = 0
        self._once = OncePerKind(log)  # errors by kind; the first of each kind logged
        self.started_at = 0.0
        self.finished_at = 0.0
        self.inference_cpu_s = 0.0
        self.batches = 0  # invokes of more than one frame

    def add_observer(self, fn: Callable[[InferenceResult], None]) -> None:
        self.observers.append(fn)

    # --- per-source figures, summed ---------------------------------------------------------------
    @property
    def source(self) -> FrameSource:
        """The first (with ``[source]``: the only) source."""
        return self.sources[0]

    @property
    def drop_oldest(self) -> bool:
        """The first source's policy (the one of a single-source pipeline)."""
        return self.lanes[0].drop_oldest

    @property
    def captured(self) -> int:
        return sum(lane.captured for lane in self.lanes)

    @property
    def dropped(self) -> int:
        return sum(lane.dropped for lane in self.lanes)

    @property
    def corrupt(self) -> int:
        return sum(lane.corrupt for lane in self.lanes)

    @property
    def capture_error(self) -> Optional[BaseException]:
        """The first source failure (an exception in a capture thread), if any."""
        return next((lane.capture_error for lane in self.lanes if lane.capture_error is not None), None)

    @property
    def capture_cpu_s(self) -> float:
        return sum(lane.capture_cpu_s for lane in self.lanes)

    def per_source(self) -> Dict[str, Dict[str, int]]:
        """Counters by source name (the daemon's summary line)."""
        return {lane.name: {"captured": lane.captured, "processed": lane.processed, "dropped": lane.dropped,
                            "corrupt": lane.corrupt, "errors": lane.errors, "reconnects": lane.health()[1],
                            "failed": int(lane.capture_error is not None)} for lane in self.lanes}

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> Pipeline:
        self.started_at = time.monotonic()
        single = len(self.lanes) == 1
        self._threads = [threading.Thread(target=self._capture_loop, args=(lane,), daemon=True,
                                          name="capture" if single else f"capture-{lane.name}")
                         for lane in self.lanes]
        self._threads.append(threading.Thread(target=self._inference_loop, name="inference", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop capture, drain queued frames through inference; True when everything finished."""
        self._stop.set()
        for src in self.sources:
            src.request_stop()
        return self.wait(timeout)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the pipeline to finish (every source ended or stopped, and drained)."""
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def run(self) -> None:
        self.start()
        self.wait()

    # --- threads ---------------------------------------------------------------------------
    def _capture_loop(self, lane: Lane) -> None:
        cpu0 = time.thread_time()
        corrupt_seen = 0
        source, stats, stop, name, put, seq = lane.source, self.stats, self._stop, lane.name, self._fq.put, self._seq
        if len(self.lanes) > 1 and not source.live:
            lower_thread_priority(FILE_CAPTURE_NICENESS)
        try:
            while not stop.is_set():
                ok, frame, t = source.read()
                while corrupt_seen < source.corrupt:
                    corrupt_seen += 1
                    stats.frame_corrupt(name)
                if not ok or frame is None:
                    break
                lane.captured += 1
                stats.frame_captured(name)
                if put(lane, (next(seq), t, frame)):
                    lane.dropped += 1
                    stats.frame_dropped(1, name)
                self._depth(lane)
        except BaseException as exc:  # a source failure must still end its capture cleanly
            lane.capture_error = exc
            log.error("capture of source %s stopped: %s", name, exc)
        finally:
            lane.capture_cpu_s = time.thread_time() - cpu0
            try:
                source.close()
            finally:
                self._fq.end(lane)

    def _depth(self, lane: Lane) -> None:
        """Report a source's queue depth to stats only when it changed (it rarely does in steady state)."""
        depth = len(lane.items)
        if depth != lane.last_depth:
            lane.last_depth = depth
            self.stats.set_queue_depth(depth, lane.name)

    def _batch_size(self) -> int:
        n = self.cfg.max_batch
        if n > 1 and len(self.lanes) > 1 and getattr(self.holder.get(), "batchable", False):
            return n
        return 1

    def _inference_loop(self) -> None:
        cpu0 = time.thread_time()
        take = self._fq.take
        try:
            while True:
                batch = take(self._batch_size())
                if not batch:
                    break
                if len(batch) == 1:
                    lane, (seq, t, frame) = batch[0]
                    self._depth(lane)
                    self._process(lane, seq, t, frame)
                else:
                    for lane in {id(lane): lane for lane, _ in batch}.values():
                        self._depth(lane)
                    self._process_batch(batch)
        finally:
            self.inference_cpu_s = time.thread_time() - cpu0
            self.finished_at = time.monotonic()
            self._done.set()

    def _failed(self, lane: Lane, seq: int, kind: str, error: str, exc: Optional[BaseException] = None) -> None:
        """Count a frame that failed; log the first of each kind (unexpected ones with the traceback)."""
        self.errors += 1
        lane.errors += 1
        self.stats.frame_failed(lane.name)
        if exc is not None:
            self._once.log(kind, logging.ERROR, "frame %d could not be processed (source %s: %s); skipping it "
                           "and going on (later %s errors are counted, not logged)", seq, lane.name, error, kind,
                           exc_info=exc)
        else:
            self._once.log(kind, logging.WARNING, "frame %d (source %s): %s (later %s errors are counted, not "
                           "logged)", seq, lane.name, error, kind)

    @property
    def error_kinds(self) -> Dict[str, int]:
        """Per-frame failures by kind (``inference``, ``non_finite_scores``, ``sink``, else the exception type)."""
        return self._once.counts()

    def _infer(self, frames: List[np.ndarray]) -> Tuple[Any, Optional[List[np.ndarray]], Optional[str], float,
                                                        List[Optional[np.ndarray]]]:
        """(model, scores per frame or None, error, seconds per frame, thumbnails per frame)."""
        model = self.holder.get()
        for attempt in range(2):
            t0 = time.perf_counter()
            try:
                if model is None:
                    raise ModelError("no model loaded")
                if len(frames) == 1:
                    scores = [model.infer(frames[0])]
                    thumbs = [getattr(model, "last_resized", None)]  # valid until the next infer: used at once
                else:
                    scores, thumbs = model.infer_batch(frames)
                    self.batches += 1
                return model, scores, None, (time.perf_counter() - t0) / len(frames), thumbs
            except ModelError as exc:
                current = self.holder.get()
                if attempt == 0 and current is not model:
                    model = current  # swapped (and maybe closed) under us: use the new one
                    continue
                return model, None, str(exc), (time.perf_counter() - t0) / len(frames), [None] * len(frames)
        raise AssertionError("unreachable")  # pragma: no cover

    def _process(self, lane: Lane, seq: int, capture_time: float, frame: np.ndarray) -> None:
        self._process_batch([(lane, (seq, capture_time, frame))])

    def _process_batch(self, batch: List[Tuple[Lane, Item]]) -> None:
        try:
            model, scores, error, latency, thumbs = self._infer([item[2] for _, item in batch])
        except Exception as exc:  # one bad frame must not end the run
            for lane, (seq, t, frame) in batch:
                self._conclude(lane, seq, t, frame, self.holder.get(), None, f"{type(exc).__name__}: {exc}", 0.0,
                               None, exc)
            return
        for i, (lane, (seq, t, frame)) in enumerate(batch):
            self._conclude(lane, seq, t, frame, model, None if scores is None else scores[i], error, latency,
                           thumbs[i])

    def _conclude(self, lane: Lane, seq: int, capture_time: float, frame: np.ndarray, model: Any,
                  scores: Optional[np.ndarray], error: Optional[str], latency: float,
                  thumbnail: Optional[np.ndarray], exc: Optional[BaseException] = None) -> None:
        """Sample one inferred frame, tell the observers, hand it to the sink when chosen."""
        self.processed += 1
        lane.processed += 1
        name = lane.name
        result: Optional[InferenceResult] = None
        try:
            if exc is not None:
                raise exc
            if scores is not None:
                top = top_score(scores)
                if math.isfinite(top):
                    decision = self.sampler.decide(scores, frame, thumbnail=thumbnail, top=top, source=name)
                    result = InferenceResult(seq, model.ref, scores, latency, None, decision.low_confidence,
                                             decision.reasons, capture_time, decision.send, decision.skipped, top,
                                             name)
                else:  # NaN would look confident to the sampler: an error, never a frame
                    error = NON_FINITE
                    self._failed(lane, seq, "non_finite_scores", f"the model returned {NON_FINITE}")
            else:
                self._failed(lane, seq, "inference", f"inference error: {error}")
        except Exception as failure:  # one bad frame must not end the run
            error = f"{type(failure).__name__}: {failure}"
            self._failed(lane, seq, type(failure).__name__, error, failure)
        if result is None:
            result = InferenceResult(seq, getattr(model, "ref", None), None, latency, error, False, [],
                                     capture_time, source=name)
        else:
            self.stats.inference(latency, result.top, result.low_confidence, name)
        for fn in self.observers:
            try:
                fn(result)
            except Exception:
                log.exception("inference observer %r failed", fn)
        if result.sampled and result.scores is not None:
            self.stats.frame_sampled(name)
            try:
                self.sink(SampledFrame(seq, capture_time, frame, result.scores, list(model.labels),
                                       result.model_ref, list(result.reasons), name))
            except Exception as failure:
                self._failed(lane, seq, "sink", f"could not hand the sampled frame on "
                                                f"({type(failure).__name__}: {failure})", failure)
