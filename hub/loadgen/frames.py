"""The load generator's frames: real ``kestrel.v1.Frame`` messages with well-formed JPEGs of about the asked size
(the hub checks every image's structure), built again identically for a resend."""

from __future__ import annotations

import math
from typing import List, Tuple

import cv2
import numpy as np

from proto import kestrel_pb2

IMAGES = 8              # distinct images per run (a frame carries images[seq % IMAGES])
MIN_FRAME_BYTES = 1024  # below this a JPEG is mostly headers
MAX_FRAME_BYTES = 4 * 1024 * 1024
MODEL = kestrel_pb2.ModelRef(name="loadgen", version=1, sha256="00" * 32)
TOP_K = [kestrel_pb2.TopScore(index=1, label="unsure", score=0.41),
         kestrel_pb2.TopScore(index=0, label="other", score=0.35)]


def jpeg_of_about(nbytes: int, seed: int) -> Tuple[bytes, int, int]:
    """A JPEG (noise at quality 90: it compresses badly, so its size follows its pixel count) of at least
    ``nbytes`` bytes and at most a few percent more; (bytes, width, height)."""
    rng = np.random.default_rng(seed)
    side = max(8, int(math.sqrt(nbytes / 1.4)))  # about 1.4 bytes per noise pixel at quality 90
    while True:
        img = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
            raise RuntimeError("OpenCV could not encode a JPEG")
        if len(buf) >= nbytes:
            return bytes(buf.tobytes()), side, side
        side = max(side + 1, int(side * math.sqrt(nbytes / max(1, len(buf)))) + 1)


def images(nbytes: int) -> List[Tuple[bytes, int, int]]:
    return [jpeg_of_about(nbytes, seed) for seed in range(IMAGES)]


def frame_id(run_id: str, device_id: str, seq: int) -> str:
    return f"{run_id}-{device_id}-{seq}"


def seq_of(frame_id_: str, prefix: str) -> int:
    """The sequence number of a frame id that starts with ``prefix`` (``<run>-<device>-``); -1 otherwise."""
    if not frame_id_.startswith(prefix):
        return -1
    tail = frame_id_[len(prefix):]
    return int(tail) if tail.isdigit() else -1


def payload(run_id: str, device_id: str, seq: int, capture_ms: int, image: Tuple[bytes, int, int]) -> bytes:
    data, w, h = image
    return kestrel_pb2.Frame(
        frame_id=frame_id(run_id, device_id, seq), device_id=device_id, capture_time_ms=capture_ms, model=MODEL,
        reasons=[kestrel_pb2.LOW_CONFIDENCE], top_k=TOP_K, image=data, image_format="jpeg", width=w, height=h,
        source="loadgen", sequence=seq, image_bytes=len(data)).SerializeToString()
