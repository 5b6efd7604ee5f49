"""Helpers of the dashboard tests: a hub fed through its real MQTT ingest (frames with real JPEGs, an
hour of telemetry, status), models pushed over gRPC, and headless Chromium (Debian's, through Playwright).

Screenshots go to ``test-artifacts/`` at the repository root (gitignored; ``KESTREL_TEST_ARTIFACTS``
moves them).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from proto import kestrel_pb2, topics
from tests.hub import REPO, publish_all

CHROMIUM = os.environ.get("KESTREL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
ARTIFACTS = Path(os.environ.get("KESTREL_TEST_ARTIFACTS", str(REPO / "test-artifacts")))
CLASSES = ["bright", "dark", "mid"]
MINUTE_MS = 60_000
BROWSER_TIMEOUT_MS = 60_000  # a busy 2-core machine renders slowly: generous waits (on conditions)


def picture(seed: int, w: int = 160, h: int = 120) -> bytes:
    """A JPEG that looks like something in a screenshot: a grey level with a shape and a number on it."""
    rng = np.random.default_rng(seed)
    level = int(rng.integers(60, 200))
    img = np.full((h, w, 3), level, np.uint8)
    img[:, :, :] = np.linspace(level - 30, level + 30, w, dtype=np.float64).clip(0, 255).astype(np.uint8)[None, :, None]
    color = tuple(int(c) for c in rng.integers(0, 255, 3))
    center = (int(rng.integers(30, w - 30)), int(rng.integers(30, h - 30)))
    cv2.circle(img, center, int(rng.integers(12, 30)), color, -1)
    cv2.putText(img, str(seed % 100), (8, h - 10), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return bytes(buf.tobytes())


def frame(frame_id: str, device: str, capture_ms: int, top: float, version: int, seq: int,
          reasons: Sequence[int] = (kestrel_pb2.LOW_CONFIDENCE,), image: Optional[bytes] = None) -> kestrel_pb2.Frame:
    """A sampled frame of the brightness model: the top-3 scores with ``top`` first."""
    order = [seq % 3, (seq + 1) % 3, (seq + 2) % 3]
    second = min(top * 0.9, (1.0 - top) * 0.6)
    scores = [top, second, max(0.0, 1.0 - top - second) if top + second < 1 else 0.0]
    scores[2] = min(scores[2], second)
    img = image if image is not None else picture(seq)
    return kestrel_pb2.Frame(
        frame_id=frame_id, device_id=device, capture_time_ms=capture_ms,
        model=kestrel_pb2.ModelRef(name="brightness", version=version, sha256="ab" * 32), reasons=list(reasons),
        top_k=[kestrel_pb2.TopScore(index=i, label=CLASSES[i], score=s) for i, s in zip(order, scores)],
        image=img, image_format="jpeg", width=160, height=120, source="cam0", sequence=seq, image_bytes=len(img))


def telemetry(device: str, t_ms: int, version: int, processed: int, low: int, hist: List[int], fps: float,
              p50: float, uptime: float, spool: int = 0, dead: int = 0) -> kestrel_pb2.Telemetry:
    return kestrel_pb2.Telemetry(
        device_id=device, time_ms=t_ms, fps=fps, latency_p50_ms=p50, latency_p95_ms=p50 * 1.8, spool_frames=spool,
        model=kestrel_pb2.ModelRef(name="brightness", version=version), uptime_s=uptime, frames_processed=processed,
        frames_sampled=low // 4, frames_low_confidence=low, score_histogram=hist, dead_letters=dead)


def status(device: str, group: str, version: int, state: str = "online", update: str = "COMMITTED",
           reason: str = "", previous: int = 0) -> kestrel_pb2.Status:
    ref = kestrel_pb2.ModelRef(name="brightness", version=version, sha256="cd" * 32)
    return kestrel_pb2.Status(
        device_id=device, state=state, time_ms=int(time.time() * 1000), group=group, model=ref,
        confidence_threshold=0.62 if version > 1 else 0.6,
        versions=kestrel_pb2.VersionManifest(installed=ref, previous=kestrel_pb2.ModelRef(name="brightness",
                                                                                          version=previous),
                                             update_state=update, reason=reason))


def telemetry_hour(device: str, now_ms: int, switch_at: int = 35, minutes: int = 60,
                   seed: int = 0) -> List[Tuple[str, bytes]]:
    """An hour of telemetry, one message a minute: v1 until minute ``switch_at`` (scores around 0.55, many
    under the threshold), then v2 (around 0.8, few): what the charts should tell apart."""
    rng = np.random.default_rng(seed)
    items = []
    processed = low = 0
    hist = [0] * 20
    for m in range(minutes):
        version = 1 if m < switch_at else 2
        fps = float(rng.normal(9.0 if version == 1 else 12.0, 0.4))
        n = int(fps * 60)
        center = 0.55 if version == 1 else 0.8
        scores = np.clip(rng.normal(center, 0.12, n), 0, 0.999)
        for s in scores:
            hist[int(s * 20)] += 1
        processed += n
        low += int((scores < 0.6).sum())
        t = now_ms - (minutes - m) * MINUTE_MS + 1000
        msg = telemetry(device, t, version, processed, low, list(hist), fps, float(rng.normal(14 if version == 1
                                                                                              else 11, 0.5)),
                        uptime=60.0 * (m + 1), spool=int(rng.integers(0, 4)))
        items.append((topics.telemetry(device), msg.SerializeToString()))
    return items


def seed_hub(host: str, port: int, devices: Sequence[Tuple[str, str]], frames_per_device: int,
             now_ms: Optional[int] = None, **tls: str) -> Dict[str, kestrel_pb2.Frame]:
    """Publish through the hub's broker: each device's hour of telemetry, its frames (newest last), its status.
    ``tls``: publish_all's ca_file/cert_file/key_file (the hub's own identity on its embedded TLS broker,
    tests.hub.hub_identity). Returns the frames by id."""
    now = now_ms or int(time.time() * 1000)
    sent: Dict[str, kestrel_pb2.Frame] = {}
    items: List[Tuple[str, bytes]] = []
    for d, (device, _group) in enumerate(devices):
        items += telemetry_hour(device, now, seed=d)
        for i in range(frames_per_device):
            seq = d * 1000 + i
            version = 1 if i < frames_per_device // 2 else 2
            top = round(0.25 + 0.33 * ((seq * 7) % 10) / 10, 3)
            reasons = [kestrel_pb2.LOW_CONFIDENCE] + ([kestrel_pb2.LOW_MARGIN] if i % 3 == 0 else [])
            f = frame(f"{device}-boot1-{i}", device, now - (frames_per_device - i) * 20_000, top, version, seq,
                      reasons)
            sent[f.frame_id] = f
            items.append((topics.frames(device), f.SerializeToString()))
    for d, (device, group) in enumerate(devices):
        st = status(device, group, 2, previous=1) if d % 3 else status(device, group, 2, update="TRIAL", previous=1)
        items.append((topics.status(device), st.SerializeToString()))
    publish_all(host, port, items, **tls)
    return sent


def http_json(url: str, token: str = "", method: str = "GET", body: Any = None,
              headers: Optional[Dict[str, str]] = None) -> Tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    h = {"Accept": "application/json", **(headers or {})}
    if token:
        h["Authorization"] = f"Bearer {token}"
    if data is not None:
        h["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


@contextlib.contextmanager
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's package; Playwright's own browser download cannot work here)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install chromium (make setup does, as root)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class PageErrors:
    """Console errors and uncaught exceptions of a page (a page 'loads with no console errors')."""

    def __init__(self, page: Any) -> None:
        self.errors: List[str] = []
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))


def new_page(b: Any, width: int = 1400, height: int = 900) -> Tuple[Any, Any, PageErrors]:
    ctx = b.new_context(viewport={"width": width, "height": height})
    ctx.set_default_timeout(BROWSER_TIMEOUT_MS)
    page = ctx.new_page()
    return ctx, page, PageErrors(page)


def login(page: Any, base: str, token: str, next_path: str = "/fleet") -> None:
    page.goto(f"{base}/login?next={next_path}")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}{next_path}*")


def screenshot(page: Any, name: str, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def report_metrics(version: int) -> Dict[str, Any]:
    """Report figures as the trainer puts them into a bundle's manifest (trainer/pipeline.py package())."""
    good = version > 1
    matrix = [[18, 1, 1], [2, 16, 2], [1, 3, 16]] if good else [[15, 2, 3], [4, 12, 4], [3, 5, 12]]
    return {"accuracy": 0.833 if good else 0.65, "float_accuracy": 0.85 if good else 0.683, "macro_f1": 0.83 if good
            else 0.64, "accuracy_drop_points": 1.7 if good else 3.3, "bytes": 41232, "latency_ms": 0.41,
            "sparsity": 0.5, "cv_accuracy_mean": 0.82, "n_test": 60, "confusion_matrix": matrix, "class_names": CLASSES,
            "ece": 0.041 if good else 0.12, "sampling": {"threshold": 0.62, "source": "sweep", "sent_share": 0.18,
                                                        "caught_share": 0.81}}


def push_models(grpc_target: str, data_dir: Path, tmp: Path, versions: Sequence[int] = (1, 2),
                model: Optional[Path] = None) -> None:
    """Sign brightness bundles with a fresh key the hub trusts (<data_dir>/trust) and push them over gRPC."""
    import shutil

    from proto.hubclient import HubClient
    from tests.helpers.bundles import make_bundle, make_keypair
    from tests.hub import grpc_credentials

    kp = make_keypair(tmp)
    trust = data_dir / "trust"
    trust.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kp.pub_path, trust / kp.pub_path.name)
    with HubClient(grpc_target, timeout_s=30.0, creds=grpc_credentials(data_dir)) as client:
        for v in versions:
            client.push(make_bundle(model, kp, version=v, labels=CLASSES, metrics=report_metrics(v)))
