"""Sampled frames -> ``kestrel_pb2.Frame`` messages -> the durable spool, off the inference thread.

JPEG-encoding a camera frame and writing it to the spool (fsync) cost milliseconds; done on the
inference thread they would slow every frame behind a sampled one. :class:`SinkWorker` takes
sampled frames through a bounded queue (``[pipeline] sink_queue_size``) and does that work on two
threads of its own (encoding; the spool write, which mostly waits for fsync), at a lower OS priority
(SINK_NICENESS, Linux): on a small device where capture and inference keep the cores busy they run
in their idle moments instead of preempting them. When the
queue is full the inference thread waits (back-pressure): a sampled frame is never dropped.
:meth:`SinkWorker.close` drains the queue before it returns, and a frame handed over after close()
is processed on the caller's thread, so nothing sampled is lost on SIGTERM.

:class:`FrameBuilder` makes the message: JPEG (``[sampler] jpeg_quality``, downscaled to
``max_image_side``), top-k scores with labels, reasons, ids. A message over ``[mqtt]
max_payload_bytes`` is re-encoded smaller (lower quality, then half the size, REENCODE_STEPS times)
before the publisher's last guard refuses it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, List, Optional, Tuple, cast

import cv2
import numpy as np

from edge.errors import FrameError
from edge.logonce import OncePerKind
from edge.pipeline.loop import SampledFrame
from edge.threadprio import lower_thread_priority
from proto import kestrel_pb2

log = logging.getLogger(__name__)

REENCODE_STEPS = 4         # smaller encodings tried for a frame over max_payload_bytes
REENCODE_MIN_QUALITY = 40  # the first step lowers the quality to this (if it was higher)
MESSAGE_SLACK = 64         # bytes the publisher still adds (sequence, image_bytes) after building
SINK_NICENESS = 10         # added to the sink threads' nice value (Linux): encoding yields to capture and inference
BUILT_QUEUE_SIZE = 32      # encoded messages waiting for the spool write (each at most max_payload_bytes)
_END = object()


def downscale(bgr: np.ndarray, max_side: int) -> np.ndarray:
    """``bgr`` shrunk so no side exceeds ``max_side`` (0 = unchanged): halvings with INTER_AREA (OpenCV's
    fast 2x path: a 2x2 mean per pixel), then one bilinear step for the remaining factor (< 2), which
    costs a fraction of INTER_AREA at an arbitrary factor and looks the same."""
    h, w = bgr.shape[:2]
    side = max(h, w)
    if max_side <= 0 or side <= max_side:
        return bgr
    f = max_side / side
    tw, th = max(1, int(round(w * f))), max(1, int(round(h * f)))
    while max(h, w) >= 2 * max_side:
        h, w = h // 2, w // 2
        bgr = cv2.resize(bgr[: 2 * h, : 2 * w], (w, h), interpolation=cv2.INTER_AREA)
    if (w, h) != (tw, th):
        bgr = cv2.resize(bgr, (tw, th), interpolation=cv2.INTER_LINEAR)
    return bgr


class FrameBuilder:
    """Turns a SampledFrame into a kestrel_pb2.Frame (JPEG, top-k, reasons, ids). ``source`` is the frame's
    own camera (``SampledFrame.source``), else ``source_name``."""

    def __init__(self, device_id: str, boot_id: str, source_name: str, top_k: int, jpeg_quality: int,
                 max_side: int, max_bytes: int = 0) -> None:
        self.device_id = device_id
        self.boot_id = boot_id
        self.source_name = source_name
        self.top_k = top_k
        self.jpeg_quality = jpeg_quality
        self.max_side = max_side
        self.max_bytes = max_bytes
        self.reencoded = 0  # frames that needed a smaller encoding to fit max_bytes

    def encode(self, bgr: np.ndarray, quality: Optional[int] = None, max_side: Optional[int] = None
               ) -> Tuple[bytes, int, int]:
        bgr = downscale(bgr, self.max_side if max_side is None else max_side)
        h, w = bgr.shape[:2]
        q = self.jpeg_quality if quality is None else quality
        try:
            ok, buf = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), int(q)])
        except cv2.error as exc:
            raise FrameError(f"JPEG encoding failed: {exc}") from exc
        if not ok:
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
            image_format="jpeg", width=w, height=h, source=s.source or self.source_name, image_bytes=len(image))
        if s.model_ref is not None:
            frame.model.CopyFrom(s.model_ref)
        if self.max_bytes and frame.ByteSize() + MESSAGE_SLACK > self.max_bytes:
            self._shrink(frame, s.bgr)
        return frame

    def _shrink(self, frame: Any, bgr: np.ndarray) -> None:
        """Re-encode ``frame.image`` smaller until the message fits (or the steps run out)."""
        quality = min(self.jpeg_quality, REENCODE_MIN_QUALITY)
        side = max(frame.width, frame.height)
        for step in range(REENCODE_STEPS):
            if step:
                side = max(16, side // 2)
            elif quality == self.jpeg_quality:
                continue  # same quality and size as the first encoding: the same bytes
            image, w, h = self.encode(bgr, quality=quality, max_side=side)
            frame.image, frame.width, frame.height, frame.image_bytes = image, w, h, len(image)
            if frame.ByteSize() + MESSAGE_SLACK <= self.max_bytes:
                self.reencoded += 1
                log.info("frame %s re-encoded to %dx%d at quality %d (%d bytes) to fit [mqtt] "
                         "max_payload_bytes=%d", frame.frame_id, w, h, quality, len(image), self.max_bytes)
                return
        # still too large: the publisher refuses it (one ERROR line, counted)


class SinkWorker:
    """A bounded hand-off from the inference thread to two threads: one builds Frame messages (JPEG
    encoding: CPU), the other stores them (the publisher's spool write: mostly waiting for fsync).

    Two stages so that camera frames are released at the speed of encoding: while one message waits
    for the disk, the next frames are encoded, and the inference thread only waits when *encoding*
    falls ``queue_size`` frames behind. Built messages (small: a JPEG of at most ``max_image_side``)
    wait in a queue of BUILT_QUEUE_SIZE. ``publish(frame) -> bool`` stores a built message (the
    publisher's ``publish_frame``). Counters: ``sampled`` (handed over), ``spooled`` (in the spool),
    ``refused`` (the publisher would not store it), ``errors`` (building or storing failed).
    """

    def __init__(self, builder: FrameBuilder, publish: Callable[[Any], bool], queue_size: int) -> None:
        self.builder = builder
        self._publish = publish
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max(1, int(queue_size)))
        self._built: queue.Queue[Any] = queue.Queue(maxsize=BUILT_QUEUE_SIZE)
        self._lock = threading.Lock()      # counters
        self._put_lock = threading.Lock()  # orders hand-overs against close(): none is left behind
        self._closed = False
        self._threads: List[threading.Thread] = []
        self._once = OncePerKind(log)
        self.sampled = 0
        self.spooled = 0
        self.refused = 0
        self.errors = 0
        self.last_done_at = 0.0  # monotonic time the last handed-over frame was stored (or failed)

    def start(self) -> SinkWorker:
        self._threads = [threading.Thread(target=self._encode_loop, name="frame-sink", daemon=True),
                         threading.Thread(target=self._store_loop, name="frame-spool", daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def put(self, s: SampledFrame) -> None:
        """Hand a sampled frame over (inference thread); waits while the queue is full."""
        with self._lock:
            self.sampled += 1
        with self._put_lock:
            inline = self._closed or not self._threads
            if not inline:
                self._q.put(s)  # may wait for room; the workers never take _put_lock
        if inline:  # nobody is consuming any more: do it here, lose nothing
            frame = self._build(s)
            if frame is not None:
                self._store(s.seq, frame)

    @property
    def pending(self) -> int:
        """Sampled frames waiting to be encoded."""
        return self._q.qsize()

    def close(self, timeout: Optional[float] = None) -> bool:
        """Spool everything handed over so far, stop the threads; True if they finished in time."""
        with self._put_lock:
            if self._closed:
                return not any(t.is_alive() for t in self._threads)
            self._closed = True
            if not self._threads:
                return True
            self._q.put(_END)
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _encode_loop(self) -> None:
        lower_thread_priority(SINK_NICENESS)
        while True:
            item = self._q.get()
            if item is _END:
                self._built.put(_END)
                break
            frame = self._build(item)
            if frame is not None:
                self._built.put((item.seq, frame))

    def _store_loop(self) -> None:
        lower_thread_priority(SINK_NICENESS)
        while True:
            item = self._built.get()
            if item is _END:
                break
            self._store(*item)

    def _build(self, s: SampledFrame) -> Any:
        try:
            return self.builder.build(s)
        except Exception as exc:  # one frame that cannot be encoded must not stop the others
            self._failed(s.seq, exc)
            return None

    def _store(self, seq: int, frame: Any) -> None:
        try:
            stored = self._publish(frame)
        except Exception as exc:
            self._failed(seq, exc)
            return
        with self._lock:
            if stored:
                self.spooled += 1
            else:
                self.refused += 1
        self.last_done_at = time.monotonic()

    def _failed(self, seq: int, exc: Exception) -> None:
        with self._lock:
            self.errors += 1
        self.last_done_at = time.monotonic()
        kind = type(exc).__name__
        self._once.log(kind, logging.ERROR, "sampled frame %d could not be encoded or spooled (%s: %s); later %s "
                       "errors are counted, not logged", seq, kind, exc, kind, exc_info=exc)
