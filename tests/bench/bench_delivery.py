"""R1 at size (issue 12): 1000 sampled frames through a broker outage, a hub SIGKILL, a device restart and
a power cut; every one stored exactly once.

Real parts: ``python -m hub serve`` (embedded Mosquitto on its secure default: TLS, client certificates,
the per-device ACL; SQLite), the device enrolled with ``kestrel-hub devices add``, the real edge daemon on a
test pattern at FPS frames/s whose every frame is low confidence (so sampled, each with the next spool
sequence), default configs except for short timeouts. The phases, in order:

1. live for LIVE_S;
2. a broker outage of OUTAGE_S: the embedded Mosquitto is frozen (SIGSTOP: it accepts nothing, answers
   nothing, and its supervisor does not restart it), then thawed; the device samples into its spool;
3. the hub SIGKILLed (its broker goes with it, cleanly) and started again HUB_DOWN_S later;
4. the device restarted (SIGTERM, then a new daemon on the same data dir: a new boot id, the same spool);
5. a power cut: the hub frozen, the broker's store saved (SIGUSR1; autosave is an hour here), the device's
   next CUT_ACKS frames acknowledged by the broker from memory only, then broker and hub SIGKILLed at once
   and the hub started again;
6. the device runs until TOTAL frames are sampled over both runs (its source ends), then stops (it waits
   for its last receipts); should anything be left in its spool, a third run on a bright (never sampled)
   video delivers it.

Figures: frames sampled, stored, lost (sampled sequences missing from the store), stored twice (a
sequence stored under two ids), the device's resends and receipts, the hub's duplicates (redeliveries it
stored once), the largest age of an unreceipted frame seen, and each phase's duration. Targets: 0 lost,
0 stored twice.

Run alone: ``.venv/bin/python -m tests.bench.run --out /tmp/bench-delivery --only bench_delivery``
(about 3 minutes). Knobs: ``KESTREL_BENCH_R1_FRAMES`` (1000), ``KESTREL_BENCH_R1_OUTAGE_S`` (60).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from demo.edge import write_video  # noqa: E402
from hub.store.sqlite import SqliteStore  # noqa: E402
from tests.helpers.edgeproc import Device, identity_mqtt  # noqa: E402
from tests.helpers.models import default_dir  # noqa: E402
from tests.helpers.wait import wait_for  # noqa: E402
from tests.hub import HubProcess, enrol, write_config  # noqa: E402

TOTAL = int(os.environ.get("KESTREL_BENCH_R1_FRAMES", "1000"))
OUTAGE_S = float(os.environ.get("KESTREL_BENCH_R1_OUTAGE_S", "60"))
FPS = 8.0
LIVE_S = 10.0
HUB_DOWN_S = 3.0
CUT_ACKS = 10
DEVICE = "cam-r1"
EDGE_MQTT = {"ack_timeout_s": 2.0, "reconnect_max_s": 2.0, "receipt_timeout_s": 2.0, "receipt_timeout_max_s": 8.0}


def stored(data: Path) -> List[int]:
    store = SqliteStore(data / "hub.db")
    try:
        return sorted(f.sequence for f in store.list_frames(device_id=DEVICE, limit=10 * TOTAL))
    finally:
        store.close()


def broker_pid(data: Path) -> int:
    return int(json.loads((data / "broker" / "broker.json").read_text())["pid"])


class AgeWatch:
    """Polls the device's oldest-unreceipted-frame age (its /metrics) and keeps the largest."""

    def __init__(self) -> None:
        self.device: Optional[Device] = None
        self.max_age_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            dev = self.device
            if dev is not None:
                self.max_age_s = max(self.max_age_s, dev.metric("kestrel_edge_oldest_unreceipted_age_seconds"))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def main(out: Path) -> Dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    models = default_dir()
    data = out / "hub"
    config = write_config(out / "hub.toml", data, extra_mqtt="embedded_autosave_s = 3600")
    hub = HubProcess(config, data, out / "hub.log").start()
    port = int(hub.info["mqtt_port"])  # type: ignore[arg-type]
    mqtt = dict(EDGE_MQTT, **identity_mqtt(enrol(config, DEVICE, out / "ids")))
    phases: Dict[str, float] = {}
    summaries: List[Dict[str, Any]] = []
    ages = AgeWatch()
    devices: List[Device] = []
    t0 = time.monotonic()

    def phase(name: str, since: float) -> float:
        now = time.monotonic()
        phases[name] = round(now - since, 1)
        print(f"   {name}: {phases[name]} s", flush=True)
        return now

    try:
        dev = Device(out, models, DEVICE, port, fps=FPS, run="-1", **mqtt)
        devices.append(dev)
        ages.device = dev
        wait_for(lambda: len(stored(data)) >= 10, 60, interval=0.2, what="frames stored")
        time.sleep(LIVE_S)  # a benchmark phase of a set length, not a synchronisation
        t = phase("live", t0)

        mosq = broker_pid(data)
        os.kill(mosq, signal.SIGSTOP)
        time.sleep(OUTAGE_S)  # the outage itself
        os.kill(mosq, signal.SIGCONT)
        t = phase("broker_outage", t)

        hub.kill()
        time.sleep(HUB_DOWN_S)  # the hub stays down a while
        hub.start()
        t = phase("hub_sigkill_and_restart", t)

        summaries.append(dev.stop())
        left = TOTAL - int(summaries[-1]["sampled"])
        if left <= int(FPS * 20):
            raise RuntimeError(f"the first run sampled {summaries[-1]['sampled']} frames: too few left for the "
                               f"power cut; lower FPS or raise KESTREL_BENCH_R1_FRAMES")
        dev = Device(out, models, DEVICE, port, fps=FPS, max_frames=left, run="-2", **mqtt)
        devices.append(dev)
        ages.device = dev
        wait_for(lambda: dev.metric("kestrel_edge_frames_receipted_total") >= 5, 60, interval=0.2,
                 what="the restarted device receipted")
        t = phase("device_restart", t)

        assert hub.proc is not None
        hub.proc.send_signal(signal.SIGSTOP)
        mosq, db = broker_pid(data), data / "broker" / "mosquitto.db"
        before = db.stat().st_mtime_ns if db.exists() else 0
        os.kill(mosq, signal.SIGUSR1)
        wait_for(lambda: db.exists() and db.stat().st_mtime_ns != before, 10, what="the broker's store saved")
        acked = dev.metric("kestrel_edge_frames_acked_total")
        wait_for(lambda: dev.metric("kestrel_edge_frames_acked_total") >= acked + CUT_ACKS, 30, interval=0.1,
                 what="frames acknowledged from the broker's memory")
        window = dev.metric("kestrel_edge_frames_awaiting_receipt")
        os.kill(mosq, signal.SIGKILL)
        hub.kill()
        hub.start()
        t = phase("power_cut", t)

        summaries.append(dev.wait(timeout=TOTAL / FPS + 120))
        if summaries[-1]["spool_frames"]:  # a third run that samples nothing delivers what is left
            bright = write_video(out / "bright.avi", [0.9, 0.95], width=64, height=48)
            dev = Device(out, models, DEVICE, port, run="-3", source={"kind": "file", "uri": str(bright)},
                         **mqtt)
            devices.append(dev)
            summaries.append(dev.wait(timeout=120))
        phase("to_the_end", t)
    finally:
        ages.stop()
        for d in devices:
            d.close()
        hub.stop()

    sampled = sum(int(s["sampled"]) for s in summaries)
    seqs = stored(data)
    ingest_log = (out / "hub.log").read_text(errors="replace")
    figures = {
        "frames_sampled": sampled, "frames_stored": len(seqs),
        "lost": len(set(range(sampled)) - set(seqs)), "stored_twice": len(seqs) - len(set(seqs)),
        "unexpected": len(set(seqs) - set(range(sampled))),
        "device_runs": len(summaries), "device_resent": sum(int(s.get("frames_resent", 0)) for s in summaries),
        "device_receipts": sum(int(s.get("receipts", 0)) for s in summaries),
        "device_refused_by_hub": sum(int(s.get("refused_by_hub", 0)) for s in summaries),
        "spool_left": int(summaries[-1]["spool_frames"]),
        "power_cut_window_frames": window, "max_unreceipted_age_s": round(ages.max_age_s, 1),
        "hub_sessions_lost_warnings": ingest_log.count("no longer had this hub's session"),
        "phases_s": phases, "total_s": round(time.monotonic() - t0, 1),
    }
    print(f"   sampled {sampled}, stored {len(seqs)}, lost {figures['lost']}, stored twice "
          f"{figures['stored_twice']}; device resent {figures['device_resent']}, power-cut window "
          f"{window:.0f} frames, oldest unreceipted frame up to {figures['max_unreceipted_age_s']} s", flush=True)
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1] if len(sys.argv) > 1 else "bench-out/bench_delivery")), indent=1))
