"""A frame's image and its thumbnail: ``GET /frames/{frame_id}/image`` and ``/frames/{frame_id}/thumb``.

The frame id is looked up in the store and only that frame's stored bytes are sent: no file name
ever comes from the request, so there is no path to trick (``/frames/../../etc/passwd/image`` is an
unknown frame id, 404). A frame's image never changes, so both answers carry an ETag (the image's
sha256) and may be cached by the browser; thumbnails are made once (OpenCV, JPEG decoded at a reduced
scale) and kept in a memory cache of ``[http] thumb_cache_mb`` (least recently used go first).
"""

from __future__ import annotations

import collections
import hashlib
import threading
from typing import Optional, Tuple

import cv2
import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from hub.auth import READ, Principal
from hub.errors import WebError
from hub.store.base import FrameRecord
from hub.web.context import ctx_of
from hub.web.principal import need

router = APIRouter(tags=["frames"])
THUMB_QUALITY = 80
CACHE_CONTROL = "private, max-age=86400"
_TYPES = {"jpeg": "image/jpeg", "jpg": "image/jpeg", "png": "image/png"}


def make_thumbnail(image: bytes, side: int) -> bytes:
    """A JPEG whose longest side is at most ``side``; WebError 422 when the stored image does not decode."""
    buf = np.frombuffer(image, np.uint8)
    img = None
    for flag in (cv2.IMREAD_REDUCED_COLOR_8, cv2.IMREAD_REDUCED_COLOR_4, cv2.IMREAD_REDUCED_COLOR_2,
                 cv2.IMREAD_COLOR):
        img = cv2.imdecode(buf, flag)
        if img is None or max(img.shape[:2]) >= side or flag == cv2.IMREAD_COLOR:
            break
    if img is None:
        raise WebError(422, "the frame's stored image does not decode")
    h, w = img.shape[:2]
    scale = side / max(h, w)
    if scale < 1:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, out = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, THUMB_QUALITY])
    if not ok:  # pragma: no cover
        raise WebError(500, "could not encode a thumbnail")
    return bytes(out.tobytes())


class ThumbCache:
    """Thumbnails by frame id, least recently used evicted beyond ``max_bytes``; thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, Tuple[bytes, str]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> Optional[Tuple[bytes, str]]:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: str, data: bytes, etag: str) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old[0])
            self._items[key] = (data, etag)
            self._bytes += len(data)
            while self._bytes > self.max_bytes and self._items:
                _, (evicted, _) = self._items.popitem(last=False)
                self._bytes -= len(evicted)


def _frame(request: Request, frame_id: str) -> FrameRecord:
    frame = ctx_of(request).store.get_frame(frame_id)
    if frame is None:
        raise WebError(404, f"frame {frame_id!r} does not exist")
    return frame


def _etag(frame: FrameRecord, what: str) -> str:
    digest = frame.image_sha256 or hashlib.sha256(frame.image).hexdigest()
    return f'"{digest[:32]}-{what}"'


def _cached(request: Request, etag: str) -> bool:
    return etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]


@router.get("/frames/{frame_id:path}/image", summary="A frame's image, exactly as the device sent it")
def frame_image(frame_id: str, request: Request, who: Principal = Depends(need(READ))) -> Response:
    frame = _frame(request, frame_id)
    etag = _etag(frame, "image")
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if _cached(request, etag):
        return Response(status_code=304, headers=headers)
    media = _TYPES.get(frame.image_format.lower(), "application/octet-stream")
    return Response(frame.image, media_type=media, headers=headers)


@router.get("/frames/{frame_id:path}/thumb", summary="A frame's thumbnail (JPEG, [http] thumb_side pixels)")
def frame_thumb(frame_id: str, request: Request, who: Principal = Depends(need(READ))) -> Response:
    ctx = ctx_of(request)
    cache: ThumbCache = ctx.thumbs
    side = ctx.http.thumb_side
    hit = cache.get(frame_id)
    if hit is not None:
        data, etag = hit
    else:
        frame = _frame(request, frame_id)
        etag = _etag(frame, f"thumb{side}")
        data = make_thumbnail(frame.image, side)
        cache.put(frame_id, data, etag)
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if _cached(request, etag):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type="image/jpeg", headers=headers)
