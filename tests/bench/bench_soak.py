"""Soak benchmark (issue 14): simulated devices into the real hub for a long time, then two hub workers with one
SIGKILLed and restarted mid-stream. The load is ``kestrel-hub loadgen`` (a process of its own: real Frame
messages at QoS 1, each frame kept until a hub's storage receipt names it, resent otherwise), counted in the
store at the end; the hubs are ``kestrel-hub serve`` processes on the default config (SQLite FULL) with a
plain broker (``[security] tls = false``, as bench_hub, so the figures stay comparable).

1. Soak: SOAK_DEVICES x SOAK_FPS frames/s for SOAK_S into one hub (its embedded Mosquitto). Figures: frames
   lost and stored twice (the store, by frame id and sequence number), the hub's RSS every second and its
   growth after the first minute (max over the rest against the sample at 60 s; target < 10 %),
   publish -> committed p50/p95/max per minute (publish: the load generator's clock when it handed paho the
   frame; committed: the receipt's committed_ms, the hub's clock on the same machine; target p95 < 50 ms in
   every minute), frames/s published and committed per second, CPU of hub, broker and load generator.
2. Two workers (``[mqtt] session_expiry_s = 0``, one share group, one SQLite file, one external Mosquitto),
   the same load for KILL_S; worker a is SIGKILLed at KILL_AT of it and started again RESTART_AFTER_S later.
   Figures: lost / stored twice (targets 0), ``takeover_s`` (from the kill to the publish time of the last
   frame that did not go straight to the surviving worker: it was in the dead one's hands and needed a resend;
   0 when none did; target <= 2 s), ``recovered_s`` (from the kill until the last of those was committed), the
   share of frames published while a was dead that b committed (1.0), and the frames per second each worker
   committed.

PNG plots beside results.json (the parent of this module's out dir): bench_soak.png (fps, latency per minute,
RSS) and bench_soak_kill.png (fps per worker, latency per second, RSS, the kill and the restart marked).

Run alone: ``.venv/bin/python -m tests.bench.run --out bench-out --only bench_soak``. Knobs:
KESTREL_BENCH_SOAK_S (600), KESTREL_BENCH_SOAK_KILL_S (120), KESTREL_BENCH_SOAK_DEVICES (50),
KESTREL_BENCH_SOAK_FPS (10), KESTREL_BENCH_SOAK_FRAME_BYTES (30000), KESTREL_BENCH_SOAK_KEEP=1 keeps the hubs'
data folders (the 10-minute soak writes about 9 GB of images; they are removed after the figures).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.bench import soak_plots  # noqa: E402
from tests.bench.bench_hub import Hub, _cpu_s  # noqa: E402
from tests.helpers.broker import Mosquitto  # noqa: E402
from tests.helpers.loadgen import Loadgen  # noqa: E402
from tests.helpers.wait import wait_for  # noqa: E402
from tests.hub import HubProcess  # noqa: E402

SOAK_S = float(os.environ.get("KESTREL_BENCH_SOAK_S", "600"))
KILL_S = float(os.environ.get("KESTREL_BENCH_SOAK_KILL_S", "120"))
DEVICES = int(os.environ.get("KESTREL_BENCH_SOAK_DEVICES", "50"))
FPS = float(os.environ.get("KESTREL_BENCH_SOAK_FPS", "10"))
FRAME_BYTES = int(os.environ.get("KESTREL_BENCH_SOAK_FRAME_BYTES", "30000"))
KEEP = os.environ.get("KESTREL_BENCH_SOAK_KEEP", "") == "1"
KILL_AT = 0.4          # of the two-worker phase
RESTART_AFTER_S = 15.0
FIRST_MINUTE_S = 60.0  # RSS growth is measured against the sample at this time (a third of a shorter run)
TARGETS = {"p95_ms": 50.0, "rss_growth": 0.10, "takeover_s": 2.0}
SAMPLE_S = 1.0


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Sampler:
    """Every SAMPLE_S: the resident memory of each named process (a callable giving its current pid, or None)."""

    def __init__(self, pids: Dict[str, Any]) -> None:
        self.pids = pids
        self.t: List[float] = []
        self.rss: Dict[str, List[int]] = {k: [] for k in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.t.append(time.time())
            for name, pid_of in self.pids.items():
                pid = pid_of()
                try:
                    self.rss[name].append(_rss_kb(pid) if pid else 0)
                except OSError:  # the process is gone (killed): 0 until it is back
                    self.rss[name].append(0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def load_records(path: Path) -> Dict[str, Any]:
    cols: Dict[str, List[Any]] = {"publish_s": [], "sends": [], "committed_ms": [], "receipt_s": [], "hub_id": []}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            cols["publish_s"].append(float(r["publish_s"]))
            cols["sends"].append(int(r["sends"]))
            cols["committed_ms"].append(int(r["committed_ms"]))
            cols["receipt_s"].append(float(r["receipt_s"]) if r["receipt_s"] else np.nan)
            cols["hub_id"].append(r["hub_id"])
    out: Dict[str, Any] = {k: np.array(v) for k, v in cols.items() if k != "hub_id"}
    out["hub_id"] = np.array(cols["hub_id"], dtype=object)
    return out


def _pct(x: np.ndarray, q: float) -> float:
    return round(float(np.percentile(x, q)), 2) if len(x) else 0.0


def _loadgen(out: Path, host: str, port: int, seconds: float, store: Path) -> Loadgen:
    return Loadgen(out, "--host", host, "--port", str(port), "--devices", str(DEVICES), "--fps", f"{FPS:g}",
                   "--duration", f"{seconds:g}", "--frame-bytes", str(FRAME_BYTES), "--store", f"sqlite:///{store}",
                   "--drain", "120", "--progress", "60")


# ---- 1. the soak ----
def bench_soak(out: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    hub = Hub(out, "soak-hub")  # fresh data dir, embedded plain broker, default config (bench_hub's)
    broker_pid = int(json.loads((hub.data / "broker" / "broker.json").read_text())["pid"])
    sampler = Sampler({"hub": lambda: hub.proc.pid if hub.proc else None})
    cpu0 = {"hub": _cpu_s(hub.proc.pid), "broker": _cpu_s(broker_pid)}
    lg = _loadgen(out, hub.host, hub.port, SOAK_S, hub.db)
    lg_cpu = 0.0
    try:
        while lg.proc.poll() is None:
            lg_cpu = _cpu_s(lg.proc.pid)
            time.sleep(1.0)
        s = lg.wait(SOAK_S + 300)
        cpu = {"hub": _cpu_s(hub.proc.pid) - cpu0["hub"], "broker": _cpu_s(broker_pid) - cpu0["broker"],
               "loadgen": lg_cpu}
        ingest = hub.health()["ingest"]
    finally:
        sampler.stop()
        lg.kill()
        hub.stop()
    rec = load_records(lg.records_path)
    t0 = float(rec["publish_s"].min())
    seconds = int(np.ceil(float(rec["publish_s"].max()) - t0)) + 1
    ok = rec["committed_ms"] > 0
    lat = rec["committed_ms"][ok] - rec["publish_s"][ok] * 1000.0
    minute = ((rec["publish_s"][ok] - t0) // 60).astype(int)
    per_min = []
    for m in range(int(minute.max()) + 1 if len(minute) else 0):
        x = lat[minute == m]
        per_min.append({"minute": m, "frames": int(len(x)), "p50_ms": _pct(x, 50), "p95_ms": _pct(x, 95),
                        "max_ms": round(float(x.max()), 2) if len(x) else 0.0})
    tens = ((rec["publish_s"][ok] - t0) // 10).astype(int)
    t_10s = list(range(0, int(tens.max()) + 1 if len(tens) else 0))
    p95_10s = [_pct(lat[tens == i], 95) for i in t_10s]
    rss_t = [t - t0 for t in sampler.t]
    rss = sampler.rss["hub"]
    base_at = min(FIRST_MINUTE_S, SOAK_S / 3)
    base_i = next((i for i, t in enumerate(rss_t) if t >= base_at), None)
    base = rss[base_i] if base_i is not None else 0
    later = [r for t, r in zip(rss_t, rss) if t >= base_at and r] or [base]
    st = s["store"]
    res = {
        "devices": DEVICES, "fps_per_device": FPS, "frame_bytes": s["frame_bytes"], "seconds": s["duration_s"],
        "sent": s["sent"], "stored": st["stored"], "lost": st["lost"], "stored_twice": st["stored_twice"],
        "not_receipted": s["not_receipted"], "resent": s["resent"], "publish_fps": s["publish_fps"],
        "loadgen_behind_max_ms": s["behind_max_ms"],
        "latency_ms": s["publish_to_committed_ms"], "publish_to_receipt_ms": s["publish_to_receipt_ms"],
        "latency_p95_ms_per_minute": [m["p95_ms"] for m in per_min],
        "latency_p95_ms_worst_minute": max((m["p95_ms"] for m in per_min), default=0.0),
        "per_minute": per_min,
        "rss_mb_first_minute": round(base / 1024.0, 1), "rss_base_at_s": base_at,
        "rss_mb_max_after": round(max(later) / 1024.0, 1), "rss_mb_end": round(rss[-1] / 1024.0, 1) if rss else 0,
        "rss_growth_after_first_minute": round(max(later) / base - 1.0, 4) if base else None,
        "rss_growth_end": round(rss[-1] / base - 1.0, 4) if base and rss else None,
        "cpu_ms_per_frame": {k: round(v * 1000.0 / max(1, s["sent"]), 3) for k, v in cpu.items()},
        "hub": {k: ingest[k] for k in ("received", "stored", "duplicates", "commits", "receipts_sent")},
        "hub_rejected": sum(ingest["rejected"].values()), "targets": TARGETS,
    }
    res["targets_met"] = {
        "lost_0": res["lost"] == 0 and res["not_receipted"] == 0, "stored_twice_0": res["stored_twice"] == 0,
        "rss_growth": res["rss_growth_after_first_minute"] is not None
        and res["rss_growth_after_first_minute"] < TARGETS["rss_growth"],
        "p95_every_minute": all(m["p95_ms"] < TARGETS["p95_ms"] for m in per_min)}
    series = {"devices": DEVICES, "fps": FPS, "frame_bytes": s["frame_bytes"], "second": list(range(seconds)),
              "published_fps": soak_plots.per_second(rec["publish_s"], t0, seconds),
              "committed_fps": soak_plots.per_second(rec["committed_ms"][ok] / 1000.0, t0, seconds),
              "minute": [m["minute"] for m in per_min], "p50_ms": [m["p50_ms"] for m in per_min],
              "p95_ms": [m["p95_ms"] for m in per_min], "max_ms": [m["max_ms"] for m in per_min],
              "t_10s": [i * 10 for i in t_10s], "p95_10s_ms": p95_10s, "rss_t": rss_t, "rss_kb": rss,
              "rss_base_kb": base}
    if not KEEP:
        shutil.rmtree(hub.data, ignore_errors=True)
    return res, series


# ---- 2. two workers, one killed ----
class Worker(HubProcess):
    def __init__(self, out: Path, name: str, broker: Mosquitto, db: Path) -> None:
        data = out / name
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        cfg = out / f"{name}.toml"
        cfg.write_text(f'[hub]\ndata_dir = "{data}"\n[store]\nurl = "sqlite:///{db}"\n[mqtt]\nhost = "{broker.host}"\n'
                       f'port = {broker.port}\nclient_id = "{name}"\nshare_group = "soak"\nsession_expiry_s = 0\n'
                       f'[grpc]\nport = 0\n[http]\nport = 0\n[security]\ndir = "{out / "security"}"\n')
        log = out / f"{name}.log"
        if log.exists():
            log.unlink()
        super().__init__(cfg, data, log)

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


def bench_kill(out: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(out / "kill-broker").start()
    db = out / "kill-shared.db"
    for p in out.glob("kill-shared.db*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    workers = {n: Worker(out, n, broker, db) for n in ("worker-a", "worker-b")}
    sampler: Optional[Sampler] = None
    lg: Optional[Loadgen] = None
    try:
        for w in workers.values():
            w.start(timeout=60)
            wait_for(lambda w=w: w.health()["broker"]["connected"], 30, what="worker connected")  # type: ignore
        a = workers["worker-a"]
        sampler = Sampler({n: (lambda w=w: w.pid) for n, w in workers.items()})
        lg = _loadgen(out, broker.host, broker.port, KILL_S, db)
        t_start = time.time()
        time.sleep(KILL_S * KILL_AT)  # a benchmark's schedule, not a synchronisation: the load runs meanwhile
        t_kill = time.time()
        a.kill()
        time.sleep(RESTART_AFTER_S)
        t_restart = time.time()
        a.start(timeout=60)
        t_up = time.time()
        s = lg.wait(KILL_S + 300)
    finally:
        if sampler is not None:
            sampler.stop()
        if lg is not None:
            lg.kill()
        for w in workers.values():
            w.stop()
        broker.stop()
    rec = load_records(lg.records_path)
    t0 = min(float(rec["publish_s"].min()), t_start)
    pub, sends, hubs = rec["publish_s"], rec["sends"], rec["hub_id"]
    committed_s = rec["committed_ms"] / 1000.0
    dead = (pub >= t_kill) & (pub < t_restart)
    detoured = dead & ((sends > 1) | (hubs != "worker-b"))
    takeover = float((pub[detoured] - t_kill).max()) if detoured.any() else 0.0
    # the frames the dead worker held when it died (published before the kill, resent) and any detoured after it
    held = ((pub < t_kill) & (sends > 1) & (committed_s >= t_kill)) | detoured
    recovered = float((committed_s[held] - t_kill).max()) if held.any() else 0.0
    st = s["store"]
    res = {
        "devices": DEVICES, "fps_per_device": FPS, "seconds": s["duration_s"], "sent": s["sent"],
        "stored": st["stored"], "lost": st["lost"], "stored_twice": st["stored_twice"],
        "not_receipted": s["not_receipted"], "resent": s["resent"], "resend_requests": s["resend_requests"],
        "kill_at_s": round(t_kill - t0, 2), "restart_at_s": round(t_restart - t0, 2),
        "restarted_worker_up_s": round(t_up - t_restart, 2),
        "takeover_s": round(takeover, 3), "recovered_s": round(recovered, 3),
        "frames_held_by_the_killed_worker": int(held.sum()),
        "survivor_share_while_dead": round(float((hubs[dead] == "worker-b").mean()), 4) if dead.any() else None,
        "receipts_by_hub": s["receipts_by_hub"], "latency_ms": s["publish_to_committed_ms"], "targets": TARGETS,
    }
    res["targets_met"] = {"lost_0": res["lost"] == 0 and res["not_receipted"] == 0,
                          "stored_twice_0": res["stored_twice"] == 0,
                          "takeover_within_2s": res["takeover_s"] <= TARGETS["takeover_s"]}
    seconds = int(np.ceil(float(pub.max()) - t0)) + 1
    ok = rec["committed_ms"] > 0
    lat = rec["committed_ms"] - pub * 1000.0
    sec = (pub - t0).astype(int)
    p50 = [_pct(lat[ok & (sec == i)], 50) for i in range(seconds)]
    p95 = [_pct(lat[ok & (sec == i)], 95) for i in range(seconds)]
    mx = [round(float(lat[ok & (sec == i)].max()), 2) if (ok & (sec == i)).any() else 0.0 for i in range(seconds)]
    series = {"devices": DEVICES, "fps": FPS, "second": list(range(seconds)),
              "published_fps": soak_plots.per_second(pub, t0, seconds),
              "committed_fps_by_hub": {h: soak_plots.per_second(committed_s[ok & (hubs == h)], t0, seconds)
                                       for h in sorted(set(hubs[ok]))},
              "p50_ms": p50, "p95_ms": p95, "max_ms": mx, "rss_t": [t - t0 for t in sampler.t] if sampler else [],
              "rss_kb_by_hub": sampler.rss if sampler else {}}
    if not KEEP:
        for p in [*out.glob("kill-shared.db*"), *(w.data_dir for w in workers.values())]:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    return res, series


def main(out_dir: Path) -> Dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Any] = {"load_avg_1m_before": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    soak, soak_series = bench_soak(out_dir / "soak")
    result["soak"] = soak
    kill, kill_series = bench_kill(out_dir / "kill")
    result["two_workers_one_killed"] = kill
    result["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    result["plots"] = [
        str(soak_plots.soak(out_dir.parent / "bench_soak.png", soak_series, TARGETS)),
        str(soak_plots.kill(out_dir.parent / "bench_soak_kill.png", kill_series,
                            {"kill": kill["kill_at_s"], "restart": kill["restart_at_s"]}))]
    (out_dir / "bench_soak.json").write_text(json.dumps(result, indent=2))
    (out_dir / "series.json").write_text(json.dumps({"soak": soak_series, "kill": kill_series}))
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench-out/bench_soak")), indent=2))
