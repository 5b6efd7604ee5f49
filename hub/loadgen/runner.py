"""The load generator's run: N simulated devices (hub.loadgen.device) at F frames/s each for a duration, then a
drain until every frame is receipted (or the drain time is up), and the figures.

Frames go out evenly spread: the k-th frame overall is due ``k / (N * F)`` s after the start and belongs to
device ``k % N``, so the broker sees a steady N * F frames/s, not bursts. The runner's one thread publishes
them (``behind_max_ms``: how late it got, i.e. whether this machine kept up) and every SWEEP_S resends the
frames whose receipt is overdue. Latencies: publish -> committed (the receipt's ``committed_ms``, the hub's
clock: exact when hub and load generator share a machine) and publish -> receipt (the load generator's clock
alone: an upper bound wherever the hub runs).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from hub.errors import ConfigError, TransportError
from hub.loadgen import frames
from hub.loadgen.device import Credentials, DeviceSettings, Record, SimDevice
from proto import topics

log = logging.getLogger("hub.loadgen")

SWEEP_S = 0.05  # how often overdue receipts are looked for
CLOSED_EARLY_MAX = 2  # connections closed by the broker before its CONNACK: it refuses this device
RECORD_FIELDS = ("device", "seq", "publish_s", "sends", "committed_ms", "receipt_s", "hub_id", "refused")


@dataclasses.dataclass
class Plan:
    devices: List[str]           # device ids (their topics)
    fps: float                   # frames per second per device
    duration_s: float
    frame_bytes: int
    settings: DeviceSettings
    credentials: List[Credentials]  # one per device, or one for all
    drain_s: float = 60.0
    connect_timeout_s: float = 30.0
    progress_s: float = 0.0      # a progress line on the log this often (0 = none)

    def validate(self) -> None:
        if not self.devices:
            raise ConfigError("loadgen: no devices to simulate (--devices must be >= 1)")
        for d in self.devices:
            try:
                topics.check_segment(d, "device id")
            except ValueError as exc:
                raise ConfigError(f"loadgen: {exc}") from exc
        if not 0 < self.fps <= 1000 or self.duration_s <= 0:
            raise ConfigError("loadgen: --fps must be in (0, 1000] and --duration > 0")
        if not frames.MIN_FRAME_BYTES <= self.frame_bytes <= frames.MAX_FRAME_BYTES:
            raise ConfigError(f"loadgen: --frame-bytes must be {frames.MIN_FRAME_BYTES}..{frames.MAX_FRAME_BYTES}")
        if len(self.credentials) not in (1, len(self.devices)):
            raise ConfigError("loadgen: one set of credentials, or one per device")
        s = self.settings
        if not 0 < s.receipt_timeout_s <= s.receipt_timeout_max_s:
            raise ConfigError("loadgen: need 0 < --receipt-timeout <= --receipt-timeout-max")
        if not 0 < s.reconnect_min_s <= s.reconnect_max_s:
            raise ConfigError("loadgen: need 0 < --reconnect-min <= --reconnect-max")
        if self.drain_s < 0 or self.progress_s < 0 or not 0 < s.port < 65536:
            raise ConfigError("loadgen: --drain and --progress must be >= 0, --port 1..65535")


def new_run_id() -> str:
    return f"lg{secrets.token_hex(3)}"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    s = sorted(values)
    return float(s[max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))])


class Run:
    def __init__(self, plan: Plan) -> None:
        plan.validate()
        self.plan = plan
        self.records: List[Record] = []  # appended by the devices' threads (list.append is atomic)
        self.images = frames.images(plan.frame_bytes)
        creds = plan.credentials
        self.devices = [SimDevice(i, d, plan.settings, creds[i] if len(creds) > 1 else creds[0], self.images,
                                  self.records.append) for i, d in enumerate(plan.devices)]
        self.behind_max_s = 0.0
        self.started = 0.0
        self.published_until = 0.0
        self.ended = 0.0
        self.stopped = False  # a plain flag, set from a signal handler (no lock may be taken there)

    def stop(self) -> None:
        """Stop publishing now (the CLI's first Ctrl-C): the drain still waits for what is out."""
        self.stopped = True

    # ---- phases ----
    def connect(self) -> None:
        p, s = self.plan, self.plan.settings
        for dev in self.devices:
            try:
                dev.start()
            except (OSError, ValueError) as exc:  # refused, unreachable, TLS handshake failed (ssl.SSLError)
                self.close()
                raise TransportError(f"loadgen: device {dev.device_id} cannot connect to {s.host}:{s.port}: {exc} "
                                     "(is the broker up? TLS and credentials: --ca-file/--identities)") from exc
        deadline = time.monotonic() + p.connect_timeout_s
        for dev in self.devices:
            while not dev.connected.wait(0.05):
                if dev.refusal is not None or dev.closed_early >= CLOSED_EARLY_MAX:
                    self.close()
                    why = dev.refusal or (f"it closed the connection before answering, {dev.closed_early} times: "
                                          "a client certificate or login it wants is missing or refused")
                    raise ConfigError(f"loadgen: the broker {s.host}:{s.port} refused device {dev.device_id}: "
                                      f"{why} (credentials, or the ACL: an enrolled identity per device, "
                                      "--identities)")
                if time.monotonic() > deadline:
                    self.close()
                    raise TransportError(f"loadgen: device {dev.device_id} got no answer from {s.host}:{s.port} "
                                         f"within {p.connect_timeout_s:g}s")

    def publish(self) -> None:
        p = self.plan
        n = len(self.devices)
        period = 1.0 / (p.fps * n)
        total = int(p.duration_s * p.fps) * n
        self.started = t0 = time.time()
        next_sweep = next_tick = t0
        k = 0
        while k < total and not self.stopped:
            now = time.time()
            due = t0 + k * period
            if due <= now:
                self.behind_max_s = max(self.behind_max_s, now - due)
                self.devices[k % n].publish(k // n, now)
                k += 1
            else:
                time.sleep(min(due - now, max(0.0, next_sweep - now)) or 0.0005)
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + SWEEP_S
            if p.progress_s and now >= next_tick:
                if next_tick > t0:
                    self._progress(now)
                next_tick = now + p.progress_s
        self.published_until = time.time()

    def drain(self) -> None:
        deadline = time.monotonic() + self.plan.drain_s
        next_tick = time.time() + (self.plan.progress_s or 1e9)
        while self.waiting() and time.monotonic() < deadline:
            now = time.time()
            self._sweep(now)
            if now >= next_tick:
                self._progress(now)
                next_tick = now + self.plan.progress_s
            time.sleep(SWEEP_S)
        self.ended = time.time()

    def close(self) -> None:
        for dev in self.devices:
            try:
                dev.stop()
            except Exception:  # noqa: BLE001 - closing what never connected
                pass

    def run(self) -> Dict[str, Any]:
        self.connect()
        try:
            self.publish()
            self.drain()
        finally:
            self.close()
        return self.summary()

    # ---- figures ----
    def _sweep(self, now: float) -> None:
        for dev in self.devices:
            dev.sweep(now)

    def waiting(self) -> int:
        return sum(dev.waiting for dev in self.devices)

    def _progress(self, now: float) -> None:
        recent = [r for r in self.records[-5000:] if r[5] > now - (self.plan.progress_s or 10.0) and r[4]]
        p95 = percentile([r[4] - r[2] * 1000.0 for r in recent], 95)
        log.info("loadgen: %.0fs: sent %d, done %d, waiting %d, resent %d, publish->committed p95 %.1f ms",
                 now - self.started, sum(d.sent for d in self.devices), len(self.records), self.waiting(),
                 sum(d.resent for d in self.devices), p95)

    def summary(self) -> Dict[str, Any]:
        devs = self.devices
        recs = [r for r in self.records if not r[7]]
        committed = [r[4] - r[2] * 1000.0 for r in recs if r[4]]
        round_trip = [(r[5] - r[2]) * 1000.0 for r in recs]
        by_hub: Dict[str, int] = {}
        for r in recs:
            by_hub[r[6] or "-"] = by_hub.get(r[6] or "-", 0) + 1
        sent = sum(d.sent for d in devs)
        elapsed = max(1e-9, self.published_until - self.started)
        return {
            "run_id": self.plan.settings.run_id, "devices": len(devs), "fps_per_device": self.plan.fps,
            "duration_s": round(elapsed, 2), "frame_bytes": len(self.images[0][0]),
            "broker": f"{self.plan.settings.host}:{self.plan.settings.port}", "receipts": self.plan.settings.receipts,
            "sent": sent, "publish_fps": round(sent / elapsed, 1), "resent": sum(d.resent for d in devs),
            "done": len(self.records), "refused": sum(d.refused for d in devs), "not_receipted": self.waiting(),
            "receipts_by_hub": dict(sorted(by_hub.items())),
            "resend_requests": max((d.resend_requests for d in devs), default=0),
            "reconnects": sum(max(0, d.connects - 1) for d in devs),
            "behind_max_ms": round(self.behind_max_s * 1000.0, 1),
            "drain_s": round(max(0.0, self.ended - self.published_until), 2),
            "publish_to_committed_ms": _stats(committed), "publish_to_receipt_ms": _stats(round_trip),
        }

    def write_records(self, path: Path) -> None:
        """One CSV row per frame done, then one per frame never receipted (receipt_s empty)."""
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(RECORD_FIELDS)
            for r in sorted(self.records, key=lambda r: r[2]):
                w.writerow([self.devices[r[0]].device_id, r[1], f"{r[2]:.4f}", r[3], r[4], f"{r[5]:.4f}", r[6], r[7]])
            for dev in self.devices:
                for seq, p in sorted(dev.pending.items()):
                    w.writerow([dev.device_id, seq, f"{p.first_s:.4f}", p.sends, 0, "", "", ""])

    def sent_by_device(self) -> Dict[str, int]:
        """device id -> frames published (sequence numbers 0 .. n-1)."""
        return {d.device_id: d.sent for d in self.devices}


def _stats(values: List[float]) -> Dict[str, float]:
    return {"n": len(values), "p50": round(percentile(values, 50), 2), "p95": round(percentile(values, 95), 2),
            "p99": round(percentile(values, 99), 2), "max": round(max(values, default=0.0), 2)}
