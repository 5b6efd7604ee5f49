"""The hub's image check (hub/ingest/imagecheck.py): the structural JPEG walk accepts what real encoders write
and refuses what a decoder refuses (truncation anywhere, broken headers and tables), agreeing with a
full decode on every such case; the decode mode is the full decoder."""

from __future__ import annotations

from typing import List, Tuple

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.ingest.imagecheck import ImageRejected, check_image, jpeg_structure


def scene(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A camera-like picture (smooth shapes plus noise), not pure noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(img.astype(np.int16) + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)


def encode(img: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, list(params))
    assert ok
    return bytes(buf.tobytes())


def encoder_outputs() -> List[Tuple[str, bytes, Tuple[int, int]]]:
    img = scene(320, 240)
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    out = [
        ("baseline q90", encode(img, cv2.IMWRITE_JPEG_QUALITY, 90), (320, 240)),
        ("baseline q20", encode(img, cv2.IMWRITE_JPEG_QUALITY, 20), (320, 240)),
        ("grey", encode(grey), (320, 240)),
        ("progressive", encode(img, cv2.IMWRITE_JPEG_PROGRESSIVE, 1), (320, 240)),
        ("optimized huffman", encode(img, cv2.IMWRITE_JPEG_OPTIMIZE, 1), (320, 240)),
        ("restart markers", encode(img, cv2.IMWRITE_JPEG_RST_INTERVAL, 2), (320, 240)),
        ("odd size", encode(scene(33, 17)), (33, 17)),
        ("1x1", encode(scene(1, 1)), (1, 1)),
        ("1280x720", encode(scene(1280, 720, 3), cv2.IMWRITE_JPEG_QUALITY, 85), (1280, 720)),
    ]
    if hasattr(cv2, "IMWRITE_JPEG_SAMPLING_FACTOR"):
        out.append(("4:4:4", encode(img, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                                    cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444), (320, 240)))
    return out


def decodes(data: bytes) -> bool:
    try:
        check_image(data, "jpeg", mode="decode")
        return True
    except ImageRejected:
        return False


@pytest.mark.parametrize("name,data,size", encoder_outputs(), ids=[n for n, _, _ in encoder_outputs()])
def test_what_encoders_write_is_accepted_by_both_modes(name: str, data: bytes, size: Tuple[int, int]) -> None:
    assert jpeg_structure(data) == size
    assert check_image(data, "jpeg", mode="decode") == size
    assert check_image(data + b"\x00trailing bytes", "jpeg") == size  # some cameras append data after EOI


def test_the_edge_devices_own_frames_are_accepted() -> None:
    from edge.pipeline.loop import SampledFrame
    from edge.uplink.sink import FrameBuilder
    from proto import kestrel_pb2

    b = FrameBuilder("cam-1", "boot", "cam0", top_k=3, jpeg_quality=85, max_side=640)
    frame = scene(1280, 720)
    s = SampledFrame(seq=1, capture_time=1.0, bgr=frame, scores=np.array([0.4, 0.35, 0.25]),
                     labels=["a", "b", "c"], model_ref=kestrel_pb2.ModelRef(name="m", version=1),
                     reasons=[kestrel_pb2.LOW_CONFIDENCE])
    msg = b.build(s)
    assert jpeg_structure(msg.image) == (640, 360) == (msg.width, msg.height)


def test_truncation_anywhere_is_refused_by_both_modes() -> None:
    for _, data, _ in encoder_outputs()[:6]:
        n = len(data)
        cuts = sorted({2, 3, 20, 100, 300, n // 4, n // 2, (3 * n) // 4, n - 200, n - 3, n - 2, n - 1})
        for cut in (c for c in cuts if 0 < c < n):
            with pytest.raises(ImageRejected):
                jpeg_structure(data[:cut])
            assert not decodes(data[:cut]), f"decoder accepted a cut at {cut}/{n}"


def _segment(data: bytes, marker: int) -> int:
    """Offset of the first segment with ``marker`` (its 0xFF byte)."""
    i = data.index(bytes([0xFF, marker]), 2)
    return i


@pytest.mark.parametrize("what", ["zero width", "bad precision", "huffman count", "quant table id",
                                  "scan component", "no frame header", "garbage", "not jpeg"])
def test_broken_headers_are_refused_and_the_decoder_agrees(what: str) -> None:
    data = bytearray(encode(scene(64, 48)))
    sof = _segment(bytes(data), 0xC0)
    if what == "zero width":
        data[sof + 7:sof + 9] = b"\x00\x00"
    elif what == "bad precision":
        data[sof + 4] = 5
    elif what == "huffman count":
        dht = _segment(bytes(data), 0xC4)
        data[dht + 5:dht + 21] = bytes([255] * 16)
    elif what == "quant table id":
        dqt = _segment(bytes(data), 0xDB)
        data[dqt + 4] = 0x07
    elif what == "scan component":
        sos = _segment(bytes(data), 0xDA)
        data[sos + 5] = 0x77
    elif what == "no frame header":
        data[sof + 1] = 0xE5  # the SOF becomes an APP5 segment
    elif what == "garbage":
        data = bytearray(b"\xff\xd8" + bytes(range(256)) * 8)
    elif what == "not jpeg":
        data = bytearray(b"GIF89a" + bytes(200))
    with pytest.raises(ImageRejected):
        check_image(bytes(data), "jpeg")
    assert not decodes(bytes(data)), f"{what}: the decoder accepted it"


def test_png_is_decoded_in_both_modes() -> None:
    png = bytes(cv2.imencode(".png", scene(40, 30))[1].tobytes())
    assert check_image(png, "png") == (40, 30) == check_image(png, "png", mode="decode")
    for bad in (png[:-20], png[:60]):
        with pytest.raises(ImageRejected):
            check_image(bad, "png")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutations_only_ever_raise_image_rejected(data: st.DataObject) -> None:
    """Random byte changes and cuts: the structural walk answers with a size or ImageRejected, nothing
    else; and whatever it accepts has the original's size (a header change that alters the size is
    refused or reported)."""
    base = bytearray(ENCODED)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(base) - 1))
        base[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        base = base[:data.draw(st.integers(0, len(base)))]
    try:
        w, h = jpeg_structure(bytes(base))
    except ImageRejected:
        return
    assert w > 0 and h > 0


ENCODED = encode(scene(96, 64), cv2.IMWRITE_JPEG_QUALITY, 80)
