"""Dashboard benchmark: the label queue and the fleet page at scale, over real HTTP, against a real hub.

A store is seeded directly (fast: Store.apply_batch in large batches, no MQTT) with FRAMES frames
(a third of them labelled, capture times over a week, four model versions, random top-1 scores) and
DEVICES devices in 5 groups with status and telemetry; then ``kestrel-hub serve`` (``python -m hub
serve``, embedded Mosquitto) runs on it and this process asks, one request at a time over one
keep-alive connection, with a viewer token:

* ``labels_html``: ``GET /labels`` (the label queue's first page: unlabelled, newest first, 48 frames)
* ``frames_json``: ``GET /api/frames`` (the same page as JSON)
* ``fleet_html``: ``GET /fleet``
* and, as figures beside the target: the least-confident order, a device filter, a group filter,
  a deep page (the cursor after 20 pages), ``/api/devices``.

Each is asked REQUESTS times after WARMUP; figures: p50 / p95 / max ms. Target (issue 10):
p95 < 150 ms for the first three on this 2-core machine. SQLite always; MongoDB as well when
``KESTREL_MONGODB_URI`` is set (a fresh database, dropped afterwards).

Run alone: ``.venv/bin/python -m tests.bench.run --out /tmp/bench-dash --only bench_dashboard``.
Knobs: ``KESTREL_BENCH_DASH_FRAMES`` (100000), ``KESTREL_BENCH_DASH_DEVICES`` (50),
``KESTREL_BENCH_DASH_REQUESTS`` (200).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hub.store.base import FrameRecord, Store  # noqa: E402
from hub.store.open import open_store  # noqa: E402
from tests.hub import HubProcess, write_config  # noqa: E402

FRAMES = int(os.environ.get("KESTREL_BENCH_DASH_FRAMES", "100000"))
DEVICES = int(os.environ.get("KESTREL_BENCH_DASH_DEVICES", "50"))
REQUESTS = int(os.environ.get("KESTREL_BENCH_DASH_REQUESTS", "200"))
WARMUP = 10
BATCH = 5000
TARGET_P95_MS = 150.0
GROUPS = ["lobby", "dock", "yard", "gate", "lab"]
CLASSES = ["cat", "dog", "fox", "owl", "bat"]
WEEK_MS = 7 * 86400 * 1000


def _images(n: int = 16) -> List[bytes]:
    out = []
    for i in range(n):
        img = np.zeros((48, 64, 3), np.uint8)
        img[:] = (i * 15 % 255, 80, 255 - i * 15 % 255)
        cv2.circle(img, (32, 24), 8 + i % 10, (255, 255, 255), -1)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 70])
        assert ok
        out.append(bytes(buf.tobytes()))
    return out


def seed(store: Store, frames: int, devices: int, now_ms: Optional[int] = None, seed_: int = 7) -> Dict[str, Any]:
    """Fill ``store`` directly: devices with status and telemetry, then frames in large batches."""
    rng = random.Random(seed_)
    now = now_ms or int(time.time() * 1000)
    images = _images()
    ids = [f"cam-{i:03d}" for i in range(devices)]
    for i, d in enumerate(ids):
        version = 4 if i % 7 else 3
        store.upsert_device(d, group=GROUPS[i % len(GROUPS)], state="offline" if i % 11 == 0 else "online",
                            last_seen_ms=now - rng.randint(0, 60_000), reported_model="animals",
                            reported_version=version, previous_version=version - 1,
                            update_state="COMMITTED" if i % 9 else "TRIAL",
                            last_telemetry={"time_ms": str(now), "fps": 10 + rng.random() * 5,
                                            "latency_p50_ms": 12.0, "latency_p95_ms": 20.0, "spool_frames": "3",
                                            "dead_letters": "0", "model": {"name": "animals", "version": "4"}})
    t0 = time.monotonic()
    done = 0
    while done < frames:
        batch: List[FrameRecord] = []
        for k in range(done, min(frames, done + BATCH)):
            top = rng.random() * 0.6 + 0.05
            order = rng.sample(range(len(CLASSES)), 3)
            img = images[k % len(images)]
            batch.append(FrameRecord(
                frame_id=f"{ids[k % devices]}-b{k // 1000}-{k}", device_id=ids[k % devices],
                capture_time_ms=now - WEEK_MS + int(k * WEEK_MS / frames), received_ms=now,
                model_name="animals", model_version=1 + k * 4 // frames, model_sha256="ab" * 32,
                reasons=["LOW_CONFIDENCE"] + (["LOW_MARGIN"] if k % 5 == 0 else []),
                top_k=[{"index": order[0], "label": CLASSES[order[0]], "score": round(top, 4)},
                       {"index": order[1], "label": CLASSES[order[1]], "score": round(top * 0.7, 4)},
                       {"index": order[2], "label": CLASSES[order[2]], "score": round(top * 0.3, 4)}],
                image=img, image_format="jpeg", width=64, height=48, source="cam0", sequence=k,
                label=CLASSES[k % len(CLASSES)] if k % 3 == 0 else None, labelled_ms=now if k % 3 == 0 else None,
                labelled_by="bench" if k % 3 == 0 else ""))
        store.apply_batch(batch, {}, {})
        done += len(batch)
    return {"frames": frames, "devices": devices, "seed_s": round(time.monotonic() - t0, 1), "device_ids": ids}


def _pct(xs: List[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]


def measure(base: str, token: str, requests: int, device: str, group: str,
            check: Optional[Callable[[str, Any], None]] = None) -> Dict[str, Dict[str, float]]:
    """p50/p95/max ms of each page over one keep-alive connection; ``check(name, response)`` once per page."""
    import httpx

    out: Dict[str, Dict[str, float]] = {}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        deep = ""
        for _ in range(20):  # the cursor of page 21 of the unlabelled queue
            deep = c.get("/api/frames", params={"after": deep} if deep else {}).json()["next"]
        pages: List[Tuple[str, str, Dict[str, str]]] = [
            ("labels_html", "/labels", {}), ("frames_json", "/api/frames", {}), ("fleet_html", "/fleet", {}),
            ("labels_least_confident", "/labels", {"order": "least_confident"}),
            ("labels_device", "/labels", {"device": device}), ("labels_group", "/labels", {"group": group}),
            ("frames_json_page_21", "/api/frames", {"after": deep}), ("devices_json", "/api/devices", {})]
        for name, path, params in pages:
            for _ in range(WARMUP):
                r = c.get(path, params=params)
                r.raise_for_status()
            if check is not None:
                check(name, r)
            times = []
            for _ in range(requests):
                t = time.perf_counter()
                r = c.get(path, params=params)
                r.raise_for_status()
                times.append((time.perf_counter() - t) * 1000)
            out[name] = {"p50_ms": round(_pct(times, 0.5), 2), "p95_ms": round(_pct(times, 0.95), 2),
                         "max_ms": round(max(times), 2), "bytes": len(r.content)}
    return out


def run_backend(out_dir: Path, store_url: str, frames: int = FRAMES, devices: int = DEVICES,
                requests: int = REQUESTS, check: Optional[Callable[[str, Any], None]] = None) -> Dict[str, Any]:
    """Seed the store at ``store_url`` ("" = SQLite in the hub's data_dir), serve it, measure."""
    from hub.auth import add_token

    data = out_dir / "hub"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    store = open_store(store_url or f"sqlite:///{data / 'hub.db'}")
    try:
        seeded = seed(store, frames, devices)
        token = add_token(store, "bench", "viewer")
    finally:
        store.close()
    cfg = write_config(out_dir / "hub.toml", data, store_url=store_url)
    hub = HubProcess(cfg, data, out_dir / "hub.log").start(timeout=120)
    try:
        base = f"http://127.0.0.1:{hub.info['http_port']}"
        pages = measure(base, token, requests, seeded["device_ids"][1], GROUPS[1], check)
    finally:
        hub.stop()
    target = {k: pages[k]["p95_ms"] < TARGET_P95_MS for k in ("labels_html", "frames_json", "fleet_html")}
    return {"frames": frames, "devices": devices, "requests_each": requests, "seed_s": seeded["seed_s"],
            "pages": pages, "target_p95_ms": TARGET_P95_MS, "meets_target": all(target.values())}


def main(out_dir: Path) -> Dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Any] = {"load_avg_1m_before": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    result["sqlite"] = run_backend(out_dir / "sqlite", "")
    mongo = os.environ.get("KESTREL_MONGODB_URI", "")
    if mongo:
        from hub.store.mongo import MongoStore
        db = f"kestrel_bench_{uuid.uuid4().hex[:8]}"
        url = mongo.rsplit("/", 1)[0] + f"/{db}" if mongo.count("/") > 2 else f"{mongo.rstrip('/')}/{db}"
        try:
            result["mongodb"] = run_backend(out_dir / "mongo", url)
        finally:
            m = MongoStore(url)
            m.client.drop_database(db)
            m.close()
    else:
        result["mongodb"] = "skipped: set KESTREL_MONGODB_URI to run it against a MongoDB server"
    result["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    (out_dir / "bench_dashboard.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench-out/bench_dashboard")), indent=2))
