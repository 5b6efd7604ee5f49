"""The whole loop on real parts: hub (embedded Mosquitto + SQLite) and edge daemon as processes,
signed bundles pushed and deployed over gRPC, frames back over MQTT, rollback, labels, export,
trainer ingest. See tests/e2e/loop.py for the orchestration and docs/demo.md for the story."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterator

import pytest

from demo.loop import DEVICE_ID, GROUP, broker_gone, edge_summary
from tests.e2e.loop import MODEL_NAME, BrightnessLoop
from tests.helpers.wait import wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def loop(tmp_path: Path, models_dir: Path) -> Iterator[BrightnessLoop]:
    lp = BrightnessLoop(tmp_path / "loop", models_dir)
    try:
        yield lp
    finally:
        lp.close()  # SIGTERM edge and hub (and the broker if the hub left it) even when the test failed


def test_train_push_deploy_infer_sample_rollback_label_export(loop: BrightnessLoop, tmp_path: Path) -> None:
    from tests.helpers.bundles import BRIGHTNESS_SPEC
    from trainer.ingest import clean, scan_sources

    loop.make_keys()
    info = loop.start_hub()
    assert info["mqtt_embedded"] is True and int(info["grpc_port"]) > 0 and int(info["http_port"]) > 0
    status, health = loop.health()
    assert status == 200 and health["store"]["backend"] and health["broker"]["connected"] is True
    broker_pid = loop.broker_pid()
    assert broker_pid is not None

    # v1: signed, pushed over gRPC, deployed to the group before the device exists (retained desired state)
    v1 = loop.bundle(1)
    pushed = loop.push(v1)
    assert pushed.model.version == 1 and pushed.model.name == MODEL_NAME
    model_sha = hashlib.sha256((loop.models_dir / "brightness_int8.tflite").read_bytes()).hexdigest()
    assert pushed.model.sha256 == model_sha
    assert [m.model.version for m in loop.client.list_models(MODEL_NAME)] == [1]
    dep = loop.deploy(MODEL_NAME, 1)
    assert dep.desired.version == 1 and dep.topic == f"kestrel/v1/groups/{GROUP}/desired"

    # a freshly flashed device (no model) waits for the hub: fetches v1, verifies, self-tests, switches, commits
    loop.start_brightness_edge()
    dev = loop.wait_device(1, "COMMITTED")
    assert dev.group == GROUP and dev.state == "online"
    assert dev.reported.name == MODEL_NAME and dev.reported.sha256 == model_sha
    assert dev.desired_model == MODEL_NAME and dev.desired_version == 1  # the group's, though it joined later
    # ...on the secure default path: TLS with its enrolled identity, desired state signed by the fleet key
    assert info["mqtt_tls"] is True and loop.identity["mqtt"]["tls"] is True
    assert loop.identity["mqtt"]["cert_file"] == "device.crt"  # found in $CREDENTIALS_DIRECTORY
    assert (loop.credentials / "device.key").stat().st_mode & 0o077 == 0
    assert dev.enrolled_group == GROUP and dev.enrolled_ms > 0
    # ...and it fetched v1 over TLS (the fleet CA) with its own token of role device (fetch only)
    assert info["grpc_tls"] is True and loop.identity["update"]["tls"] is True
    assert loop.identity["update"]["token_file"] == "grpc-token" and loop.identity["update"]["ca_file"] == "ca.crt"
    assert (loop.credentials / "grpc-token").stat().st_mode & 0o077 == 0
    assert loop.store.get_token(f"device.{DEVICE_ID}").role == "device"
    logged = (loop.work / "tools.log").read_text() + (loop.work / "hub.log").read_text()
    for token in (loop.access.token_file("trainer"), loop.access.token_file("operator"),
                  loop.credentials / "grpc-token"):
        assert token.read_text().strip() not in logged and token.stat().st_mode & 0o077 == 0

    # low-confidence frames of v1 land in the hub's SQLite store with the right ids, version and reasons
    frames = loop.wait_frames(MODEL_NAME, 1, n=3)
    for f in frames:
        assert f.device_id == DEVICE_ID and f.frame_id.startswith(f"{DEVICE_ID}-")
        assert f.model_sha256 == model_sha
        assert "LOW_CONFIDENCE" in f.reasons
        assert float(f.top_k[0]["score"]) < 0.6, f.top_k  # the sampler forwarded it for a reason
        assert f.image_format == "jpeg" and f.width == 160 and f.height == 120

    # v2: the device moves forward, v1 becomes its previous slot
    loop.push(loop.bundle(2))
    loop.deploy(MODEL_NAME, 2)
    dev = loop.wait_device(2, "COMMITTED")
    assert dev.versions.previous.version == 1
    assert dev.desired_model == MODEL_NAME and dev.desired_version == 2
    loop.wait_frames(MODEL_NAME, 2, n=1)

    # fleet rollback (`kestrel-hub rollback --group`): back to its own previous slot (v1), never an older
    # bundle over the network
    rb = loop.rollback()
    assert rb["desired"]["rollback"] is True and rb["topic"] == f"kestrel/v1/groups/{GROUP}/desired", rb
    dev = loop.wait_device(1, "ROLLED_BACK")
    # "previous" is what a rollback would go to: nothing (v2 was rolled back from, and is rejected)
    assert dev.versions.previous.version == 0 and "rollback" in dev.versions.reason

    # telemetry (every second) reaches the hub and lands on the device record
    wait_for(lambda: (loop.health()[1] or {}).get("ingest", {}).get("telemetry", 0) >= 1, 15, what="telemetry")
    def telemetry_stored() -> bool:
        d = loop.store.get_device(DEVICE_ID)
        return bool(d is not None and d.last_telemetry and d.group == GROUP)

    wait_for(telemetry_stored, 15, what="telemetry on the device record")

    # a person labels stored frames; the hub exports them; the trainer ingests the export
    stored = loop.frames()
    labelled = loop.label(stored[:15])
    assert sum(labelled.values()) == min(15, len(stored))
    out = tmp_path / "dataset"
    loop.export(out)                              # `kestrel-hub export`: LoopError with its error line if it fails
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == labelled
    assert {fr["device_id"] for fr in manifest["frames"]} == {DEVICE_ID}
    if len(labelled) >= 2:  # the trainer needs two classes; the pattern gives three levels of grey
        scan = scan_sources([str(out)])
        ds, report = clean(scan, BRIGHTNESS_SPEC, min_side=8, phash_distance=4)
        assert report["seen"] == sum(labelled.values())
        assert set(ds.class_names) <= set(labelled) and report["kept"] >= 2
        assert report["manifests"][str(out)]["frames"] == sum(labelled.values())
    else:  # pragma: no cover - only with a pattern that has no mid-grey variety
        pytest.fail(f"labels cover only {labelled}: the test pattern should give two classes or more")

    # shutdown: the edge exits 0 with its spool drained; every frame it sent is in the store exactly once
    assert loop.stop_edge() == 0
    summary = edge_summary(loop.work / "edge.log")
    assert summary["spool_frames"] == 0 and summary["errors"] == 0
    total_sent = int(summary["spooled"])
    assert loop.stop_hub() == 0
    assert broker_gone(broker_pid), "the embedded Mosquitto outlived the hub"
    from hub.store.open import open_store

    store = open_store(str(loop.hub_dir / "hub.db"))
    try:
        assert store.count_frames(DEVICE_ID) == total_sent
    finally:
        store.close()
    assert re.search(r"update TRIAL -> COMMITTED", (loop.work / "edge.log").read_text())
    assert "ignored a desired-state message" not in (loop.work / "edge.log").read_text()  # every order was signed
