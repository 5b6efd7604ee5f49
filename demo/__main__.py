"""``python -m demo --out DIR`` (``make demo``): run the whole loop and tell its story with figures.

Exits 0 when every step worked, 1 with ``demo failed at step N (what): why`` otherwise, 2 on bad
arguments (an --out that is not a previous demo output, missing test models).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TypeVar

T = TypeVar("T")
MARKER = "demo.json"   # written into --out: marks it as ours, so a re-run may clear it
LABEL_FRAMES = 30      # how many stored frames a "person" labels


class Narrator:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.n = 0
        self.current = ""

    def step(self, what: str) -> None:
        self.n += 1
        self.current = what
        print(f"\n[{self.n}] {what}  (t={time.monotonic() - self.t0:.1f}s)", flush=True)

    @staticmethod
    def say(text: str) -> None:
        print(f"    {text}", flush=True)


def _prepare_out(out: Path) -> Optional[str]:
    """Empty ``out`` if it is a previous demo output (or empty); refuse anything else."""
    if out.exists():
        if not out.is_dir():
            return f"--out {out} exists and is not a directory: pick another path"
        if any(out.iterdir()) and not (out / MARKER).is_file():
            return f"--out {out} is not empty and not a previous demo output: pick another path or empty it"
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return None


def _timed(fn: Callable[[], T]) -> tuple:
    t = time.monotonic()
    r = fn()
    return r, time.monotonic() - t


def run(out: Path, models_dir: Path, nar: Narrator) -> Dict[str, Any]:
    from edge.keys import key_id, load_private_key
    from tests.e2e.loop import DEVICE_ID, GROUP, MODEL_NAME, Loop, broker_gone, http_json
    from tests.helpers.bundles import BRIGHTNESS_SPEC
    from trainer.ingest import clean, scan_sources

    figures: Dict[str, Any] = {}
    with Loop(out, models_dir) as loop:
        nar.step("keys: an Ed25519 signing key for the trainer, its public half trusted by hub and device")
        priv = loop.make_keys()
        nar.say(f"{priv} (key id {key_id(load_private_key(priv))}); trust dir {loop.trust_dir}")

        nar.step("hub: `python -m hub serve` on embedded defaults (own Mosquitto, SQLite, free ports)")
        info, took = _timed(loop.start_hub)
        nar.say(f"healthy after {took:.1f}s: gRPC 127.0.0.1:{info['grpc_port']}, HTTP {loop.http_base}, "
                f"MQTT {info['mqtt_host']}:{info['mqtt_port']} (embedded), store {info['store']}")
        broker_pid = loop.broker_pid()

        nar.step(f"trainer side: sign bundles {MODEL_NAME} v1 and v2 (brightness int8 test model + "
                 "self-test cases from the edge runtime), push v1 over gRPC, deploy to group "
                 f"{GROUP!r}")
        v1, v2 = loop.bundle(1), loop.bundle(2)
        pushed = loop.push(v1)
        nar.say(f"hub accepted v{pushed.model.version}: {pushed.size} bytes, sha256 {pushed.bundle_sha256[:12]}")
        dep = loop.deploy(1)
        t_deploy1 = time.monotonic()
        nar.say(f"desired state v{dep.desired.version} published retained on {dep.topic}")

        nar.step(f"edge: `python -m edge run` as device {DEVICE_ID!r} (test pattern at 25 fps, bootstrap "
                 "model brightness_float.tflite)")
        loop.start_edge()
        dev = loop.wait_device(1, "COMMITTED", timeout=60)
        figures["time_to_v1_s"] = round(time.monotonic() - t_deploy1, 2)
        nar.say(f"fetched, verified, self-tested, switched and committed v1 {figures['time_to_v1_s']:.1f}s "
                f"after the deploy (incl. daemon start): {dev.versions.reason}")

        nar.step("frames: low-confidence frames come back over MQTT into the hub's store")
        frames = loop.wait_frames(1, n=5, timeout=60)
        f = loop.store.get_frame(frames[0].frame_id) or frames[0]
        nar.say(f"{len(frames)} frames of v1 so far; newest {f.frame_id}: reasons {f.reasons}, top "
                f"{f.top_k[0]['label']} {float(f.top_k[0]['score']):.2f}, {f.width}x{f.height} "
                f"{f.image_format}, {len(f.image or b'')} bytes")

        nar.step("update: push v2 and deploy it; the device moves forward")
        loop.push(v2)
        loop.deploy(2)
        t = time.monotonic()
        dev = loop.wait_device(2, "COMMITTED", timeout=60)
        figures["time_to_v2_s"] = round(time.monotonic() - t, 2)
        nar.say(f"v2 COMMITTED {figures['time_to_v2_s']:.1f}s after the deploy (fetch + verify + self-test + "
                f"hot swap + trial); previous slot v{dev.versions.previous.version}")
        loop.wait_frames(2, n=1, timeout=60)

        nar.step(f"rollback: `kestrel-hub rollback --group {GROUP}`; the device returns to its own previous slot")
        loop.rollback()
        t = time.monotonic()
        dev = loop.wait_device(1, "ROLLED_BACK", timeout=60)
        figures["time_to_rollback_s"] = round(time.monotonic() - t, 2)
        nar.say(f"back on v{dev.reported.version} after {figures['time_to_rollback_s']:.1f}s: "
                f"{dev.versions.reason}")
        _, health = http_json(loop.http_base + "/healthz")
        ingest = (health or {}).get("ingest", {})
        nar.say(f"hub ingest so far: received {ingest.get('received')}, stored {ingest.get('stored')}, "
                f"telemetry {ingest.get('telemetry')}, status {ingest.get('status')}")

        nar.step("labels and export: a person labels stored frames; `kestrel-hub export` writes a data set")
        stored = loop.frames()
        by_version: Dict[str, int] = {}
        for fr in stored:
            k = f"{fr.model_name} v{fr.model_version}"
            by_version[k] = by_version.get(k, 0) + 1
        nar.say(f"{len(stored)} frames stored for {DEVICE_ID}: " +
                ", ".join(f"{n} from {k}" for k, n in sorted(by_version.items())))
        labelled = loop.label(stored[:LABEL_FRAMES])
        nar.say(f"labelled {sum(labelled.values())}: {labelled}")
        dataset = out / "dataset"
        r = loop.export(dataset)
        if r.returncode != 0:
            raise RuntimeError(f"kestrel-hub export exited {r.returncode}: {r.stderr.strip()}")
        manifest = json.loads((dataset / "manifest.json").read_text())
        nar.say(f"exported {len(manifest['frames'])} frames to {dataset}: {manifest['classes']}")

        nar.step("trainer: ingest the export (the next training run's input; closes the loop)")
        scan = scan_sources([str(dataset)])
        if len({c.label for c in scan.candidates}) < 2:
            raise RuntimeError("the export has fewer than two classes; the trainer cannot use it")
        ds, report = clean(scan, BRIGHTNESS_SPEC, min_side=8, phash_distance=4)
        nar.say(f"trainer.ingest kept {report['kept']} of {report['seen']} images in classes {ds.class_names} "
                f"({report['near_duplicate_groups']['groups']} near-duplicate groups); "
                f"next: `kestrel-train run --data {dataset} ...`")

        nar.step("shutdown: SIGTERM the edge (spool flushed), then the hub (and its Mosquitto)")
        if loop.stop_edge() != 0:
            raise RuntimeError(f"the edge daemon exited non-zero; see {loop.work / 'edge.log'}")
        summary = _edge_summary(loop.work / "edge.log")
        if loop.stop_hub() != 0:
            raise RuntimeError(f"the hub exited non-zero; see {loop.work / 'hub.log'}")
        if not broker_gone(broker_pid):
            raise RuntimeError(f"the embedded Mosquitto (pid {broker_pid}) outlived the hub")
        from hub.store.open import open_store

        store = open_store(str(loop.hub_dir / "hub.db"))
        try:
            in_store = store.count_frames(DEVICE_ID)
        finally:
            store.close()
        nar.say(f"edge: {summary.get('processed')} frames inferred, {summary.get('sampled')} sampled and sent, "
                f"{summary.get('spool_frames')} left in the spool; hub store holds {in_store}")
        if in_store != summary.get("spooled"):
            raise RuntimeError(f"the device sent {summary.get('spooled')} frames but the hub stored {in_store}")
        figures.update({"frames_inferred": summary.get("processed"), "frames_sent": summary.get("spooled"),
                        "frames_stored": in_store, "frames_by_model": by_version, "labels": labelled,
                        "exported": len(manifest["frames"]), "trainer_kept": report["kept"]})
    return figures


def _edge_summary(log: Path) -> Dict[str, Any]:
    lines: List[str] = [ln for ln in log.read_text(errors="replace").splitlines() if "edge.daemon: summary " in ln]
    if not lines:
        raise RuntimeError(f"the edge daemon logged no summary; see {log}")
    return dict(json.loads(lines[-1].split("edge.daemon: summary ", 1)[1]))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo-out", help="working directory (keys, hub and device data, logs, "
                                                      "export); cleared if it holds a previous demo run")
    ap.add_argument("--models", default="", help="test models directory (default: $KESTREL_TEST_MODELS or "
                                                 ".cache/test-models)")
    args = ap.parse_args(argv)
    from tests.helpers.models import default_dir

    models_dir = Path(args.models) if args.models else default_dir()
    needed = ("brightness_int8.tflite", "brightness_float.tflite", "labels.txt")
    missing = [n for n in needed if not (models_dir / n).is_file()]
    if missing:
        print(f"demo: error: test models missing in {models_dir} ({', '.join(missing)}): run "
              f"`PYTHONPATH=. .venv/bin/python -m tests.helpers.models --out {models_dir}` first", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    problem = _prepare_out(out)
    if problem:
        print(f"demo: error: {problem}", file=sys.stderr)
        return 2
    (out / MARKER).write_text(json.dumps({"started": time.time()}) + "\n")
    nar = Narrator()
    print(f"Kestrel demo in {out} (logs: {out / 'hub.log'}, {out / 'edge.log'})")
    try:
        figures = run(out, models_dir, nar)
    except KeyboardInterrupt:
        print("\ndemo interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line per failure, whatever failed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"\ndemo failed at step {nar.n} ({nar.current}): {first}", file=sys.stderr)
        print(f"details: {out / 'hub.log'}, {out / 'edge.log'}", file=sys.stderr)
        return 1
    figures["total_s"] = round(time.monotonic() - nar.t0, 1)
    (out / MARKER).write_text(json.dumps({"figures": figures}, indent=1, sort_keys=True) + "\n")
    print(f"\nloop closed in {figures['total_s']:.1f}s: v1 live {figures['time_to_v1_s']:.1f}s after deploy, "
          f"v2 in {figures['time_to_v2_s']:.1f}s, rollback in {figures['time_to_rollback_s']:.1f}s, "
          f"{figures['frames_stored']} frames stored, {figures['exported']} exported for training. "
          f"Figures: {out / MARKER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
