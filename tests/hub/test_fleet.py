"""Fleet: deploy/rollback publish retained DesiredState on the real broker; ListDevices over real gRPC."""

from __future__ import annotations

import argparse
import hashlib
import json
import uuid

import paho.mqtt.client as mqtt
import pytest

from hub.cli import devices as devicescmd
from hub.cli import fleet as fleetcmd
from hub.errors import NotFound
from hub.fleet import FleetRequestError, FleetService
from hub.registry import Registry, RegistryConfig
from hub.store.base import GroupDesired
from hub.store.open import open_store
from proto import kestrel_pb2, topics
from proto.hubclient import HubClient, HubRefused
from proto.keys import public_key_text
from tests.helpers import hubgrpc
from tests.helpers.bundles import make_bundle, make_keypair
from tests.helpers.mqtt import Collector


@pytest.fixture
def publisher(broker):
    """publish_retained as the hub's server provides it: QoS 1, retained, waits for the broker's ack."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-hub-{uuid.uuid4().hex[:8]}")
    client.connect(broker.host, broker.port)
    client.loop_start()

    def publish_retained(topic: str, payload: bytes) -> None:
        info = client.publish(topic, payload, qos=topics.QOS_DESIRED, retain=True)
        info.wait_for_publish(timeout=10)
        assert info.is_published()

    yield publish_retained
    client.loop_stop()
    client.disconnect()


@pytest.fixture
def fleet_hub(tmp_path, publisher):
    keys = make_keypair(tmp_path, "fleet")
    data = tmp_path / "hub"
    (data / "trust").mkdir(parents=True)
    (data / "trust" / "fleet.pub").write_text(public_key_text(keys.public))
    store = open_store(data / "hub.db")
    reg = Registry(store, RegistryConfig(), data)
    fleet = FleetService(store, reg, publisher, grpc_target="hub.example:50051")
    server, port, creds = hubgrpc.serve(reg, fleet, store)
    client = hubgrpc.client(port, creds)
    yield store, client, keys, port
    client.close()
    server.stop(None)
    store.close()


def _cli(client: HubClient, tmp_path, **kw) -> argparse.Namespace:  # noqa: ANN001
    """The arguments of a `kestrel-hub` fleet command run against ``client``'s hub, with its token in a file."""
    token = tmp_path / "cli.token"
    token.write_text(client.creds.token + "\n")
    token.chmod(0o600)
    return argparse.Namespace(hub=client.target, timeout=10, json=False, token_file=str(token), ca_file="",
                              plaintext=True, config=None, **kw)


def _group() -> str:
    return f"g-{uuid.uuid4().hex[:10]}"


def test_deploy_to_group_publishes_retained_desired_state(fleet_hub, broker, models_dir):
    store, client, keys, _ = fleet_hub
    bundle = make_bundle(models_dir / "brightness_int8.tflite", keys, version=7)
    client.push(bundle)
    group = _group()
    store.upsert_device("cam-a", group=group)
    resp = client.deploy("brightness", 7, group=group)
    assert resp.topic == topics.group_desired(group)

    # A subscriber arriving later still receives it: it is retained.
    sub = Collector(broker.host, broker.port, [topics.group_desired(group)])
    try:
        (payload,) = sub.wait_count(1, "/desired")
        assert sub.messages[0][2] is True  # retain flag
    finally:
        sub.close()
    desired = kestrel_pb2.DesiredState.FromString(payload)
    assert (desired.model_name, desired.version, desired.rollback) == ("brightness", 7, False)
    assert desired.sha256 == hashlib.sha256(bundle).hexdigest() and desired.size == len(bundle)
    assert desired.grpc_target == "hub.example:50051" and desired.issued_ms > 0
    dev = store.get_device("cam-a")
    assert (dev.desired_model, dev.desired_version) == ("brightness", 7)


def test_rollback_publishes_rollback_true(fleet_hub, broker):
    store, client, _, _ = fleet_hub
    group = _group()
    store.set_group_desired(group, "brightness", 3, False, 1)  # v3 was deployed to the group
    store.upsert_device("cam-r", group=group, reported_model="brightness", reported_version=3,
                        previous_version=2)
    resp = client.rollback(group=group)
    dev_resp = client.rollback(device_id="cam-r")
    sub = Collector(broker.host, broker.port, [topics.group_desired(group), topics.device_desired("cam-r")])
    try:
        sub.wait_count(2, "/desired")
        by_topic = {t: kestrel_pb2.DesiredState.FromString(p) for t, p, _ in sub.messages}
    finally:
        sub.close()
    assert resp.topic in by_topic and dev_resp.topic in by_topic
    group_msg = by_topic[topics.group_desired(group)]
    assert group_msg.rollback is True and group_msg.rollback_from_version == 3  # the group's deployed version
    dev_msg = by_topic[topics.device_desired("cam-r")]
    assert dev_msg.rollback is True and dev_msg.version == 2 and dev_msg.sha256 == ""
    assert dev_msg.rollback_from_version == 3  # the version the device reported
    with pytest.raises(HubRefused) as ei:
        client.rollback(device_id="never-seen")
    assert ei.value.code == "NOT_FOUND"


def test_list_devices_shows_desired_and_reported(fleet_hub, models_dir, capsys, tmp_path):
    store, client, keys, _ = fleet_hub
    client.push(make_bundle(models_dir / "brightness_int8.tflite", keys, version=2))
    group = _group()
    store.upsert_device("cam-1", group=group, state="online", last_seen_ms=1_700_000_000_000,
                        reported_model="brightness", reported_version=1, update_state="COMMITTED", threshold=0.71)
    store.upsert_device("cam-2", group="elsewhere", state="offline")
    client.deploy("brightness", 0, device_id="cam-1")  # 0 = highest
    (dev,) = client.list_devices(group)
    assert not dev.overrides_group  # its group was never told anything
    client.deploy("brightness", 2, group=group)  # the group's order, hidden by cam-1's own

    (dev,) = client.list_devices(group)
    assert dev.overrides_group and dev.desired_scope == "device"
    assert dev.device_id == "cam-1" and dev.state == "online"
    assert (dev.desired_model, dev.desired_version) == ("brightness", 2)
    assert (dev.reported.name, dev.reported.version) == ("brightness", 1)
    assert dev.versions.update_state == "COMMITTED"
    assert dev.threshold == pytest.approx(0.71)
    assert {d.device_id for d in client.list_devices()} >= {"cam-1", "cam-2"}

    ns = _cli(client, tmp_path, group=group)
    assert devicescmd.run_devices(ns) == 0  # `kestrel-hub devices` (no ACTION: list)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["DEVICE", "GROUP", "STATE"] and "IDENTITY" in out[0]
    assert "cam-1" in out[1] and "brightness v2 (device, overrides group)" in out[1] and "brightness v1" in out[1]
    header = out[0].split()
    col = out[0].index("THRESHOLD")
    assert "THRESHOLD" in header and out[1][col:].split()[0] == "0.71"   # the threshold each device runs
    ns.json = True
    assert devicescmd.run_devices(ns) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["device_id"] == "cam-1" and row["desired_version"] == "2" and row["overrides_group"] is True


def test_deploy_errors_map_to_status_codes(fleet_hub, models_dir):
    _, client, keys, _ = fleet_hub
    client.push(make_bundle(models_dir / "brightness_int8.tflite", keys, version=1))
    with pytest.raises(HubRefused) as ei:
        client.deploy("brightness", 9, group="lab")
    assert ei.value.code == "NOT_FOUND"
    with pytest.raises(HubRefused) as ei:
        client.deploy("brightness", 1, device_id="cam", group="lab")
    assert ei.value.code == "INVALID_ARGUMENT" and "exactly one" in ei.value.detail
    with pytest.raises(HubRefused) as ei:
        client.deploy("brightness", 1, group="bad/group")
    assert ei.value.code == "INVALID_ARGUMENT"


def test_cli_deploy_and_models(fleet_hub, models_dir, capsys, tmp_path):
    _, client, keys, _ = fleet_hub
    model = models_dir / "brightness_int8.tflite"
    client.push(make_bundle(model, keys, version=1, metrics={"accuracy": 0.875}))
    group = _group()
    ns = _cli(client, tmp_path, model="brightness", version=1, device="", group=group)
    assert fleetcmd.run_deploy(ns) == 0
    assert f"brightness v1 -> {topics.group_desired(group)}" in capsys.readouterr().out
    assert fleetcmd.run_models(_cli(client, tmp_path, model="")) == 0
    out = capsys.readouterr().out
    assert "accuracy=0.875" in out and keys.key_id in out
    models = _cli(client, tmp_path, model="")
    models.json = True
    assert fleetcmd.run_models(models) == 0
    (m,) = json.loads(capsys.readouterr().out)
    assert m["metrics"] == {"accuracy": 0.875} and m["model"]["version"] == "1"


def test_fleet_service_validates_targets(tmp_path):
    store = open_store(tmp_path / "hub.db")
    published = []
    fleet = FleetService(store, Registry(store, RegistryConfig(), tmp_path), lambda t, p: published.append(t))
    with pytest.raises(FleetRequestError):
        fleet.rollback()
    with pytest.raises(NotFound):
        fleet.deploy("brightness", 1, group="lab")
    assert published == []
    store.close()


def _desired(client: HubClient, group: str) -> dict:
    return {d.device_id: (d.desired_model, d.desired_version) for d in client.list_devices(group)}


def test_device_joining_after_a_group_deploy_lists_the_groups_desired_version(fleet_hub, models_dir):
    store, client, keys, _ = fleet_hub
    client.push(make_bundle(models_dir / "brightness_int8.tflite", keys, version=3))
    group = _group()
    client.deploy("brightness", 3, group=group)  # no device of the group is known yet
    assert store.get_group_desired(group).version == 3  # type: ignore[union-attr]
    store.upsert_device("late-cam", group=group, state="online")  # its first status arrives
    assert _desired(client, group) == {"late-cam": ("brightness", 3)}


def test_pinned_device_keeps_its_own_desired_version_after_a_group_deploy(fleet_hub, models_dir):
    store, client, keys, _ = fleet_hub
    for v in (1, 2):
        client.push(make_bundle(models_dir / "brightness_int8.tflite", keys, version=v))
    group = _group()
    store.upsert_device("pinned", group=group)
    store.upsert_device("follower", group=group)
    client.deploy("brightness", 1, device_id="pinned")
    client.deploy("brightness", 2, group=group)
    assert _desired(client, group) == {"pinned": ("brightness", 1), "follower": ("brightness", 2)}
    assert store.get_device("pinned").desired_version == 1  # type: ignore[union-attr]
    assert store.get_device("follower").desired_scope == "group"  # type: ignore[union-attr]


def test_group_rollback_shows_in_the_listing(fleet_hub, models_dir):
    store, client, keys, _ = fleet_hub
    for v in (1, 2):
        client.push(make_bundle(models_dir / "brightness_int8.tflite", keys, version=v))
    group = _group()
    client.deploy("brightness", 2, group=group)
    store.upsert_device("cam-x", group=group, reported_model="brightness", reported_version=2,
                        previous_version=1)
    assert _desired(client, group) == {"cam-x": ("brightness", 2)}
    client.rollback(group=group)
    gd = store.get_group_desired(group)
    assert gd is not None and gd.rollback is True and gd.version == 0
    # the known device is shown going back to its own previous slot; one joining after the rollback
    # shows no desired version (the hub cannot know its previous slot), not the rolled-back v2
    store.upsert_device("cam-new", group=group)
    assert _desired(client, group) == {"cam-x": ("brightness", 1), "cam-new": ("", 0)}
    client.deploy("brightness", 2, group=group)  # a later deploy replaces the rollback for both
    assert _desired(client, group) == {"cam-x": ("brightness", 2), "cam-new": ("brightness", 2)}


def test_a_rollback_no_device_would_act_on_is_refused(fleet_hub, broker, publisher):
    """Devices act only on the version they run: a rollback naming none would be ignored by every
    device while the operator saw success. The hub refuses it (one line) and announces nothing."""
    store, client, _, _ = fleet_hub
    never, rolled, cam = _group(), _group(), f"cam-{uuid.uuid4().hex[:8]}"
    store.set_group_desired(rolled, "brightness", 0, True, 1)  # the last announcement was a rollback
    store.upsert_device(cam, group=never)  # known, but reports no model
    for kw, why in (({"group": never}, "no version was deployed"), ({"group": rolled}, "was a rollback already"),
                    ({"device_id": cam}, "reports no installed model")):
        with pytest.raises(HubRefused) as ei:
            client.rollback(**kw)
        assert ei.value.detail.startswith("nothing to roll back from: ") and why in ei.value.detail
        assert "\n" not in ei.value.detail and ei.value.code == "FAILED_PRECONDITION"
    gd = store.get_group_desired(never)
    assert gd is None and store.get_device(cam).desired_scope == ""  # type: ignore[union-attr]
    marker = f"test/marker-{uuid.uuid4().hex[:8]}"
    sub = Collector(broker.host, broker.port, [topics.group_desired(never), topics.device_desired(cam), marker])
    try:
        publisher(marker, b"m")  # delivered after any retained message of the subscription
        sub.wait_count(1, marker)
        assert [t for t, _, _ in sub.messages] == [marker]  # nothing was announced
    finally:
        sub.close()


def test_deploy_is_recorded_before_it_is_announced(tmp_path, models_dir):
    """The broker refuses the announcement: the caller gets a TransportError (gRPC UNAVAILABLE, so the
    operator retries); the record existed when the publish was tried and the previous one is put back,
    so the store never shows an announcement the broker did not take (deploy and rollback alike)."""
    from hub.errors import TransportError

    keys = make_keypair(tmp_path, "fleet")
    data = tmp_path / "hub"
    (data / "trust").mkdir(parents=True)
    (data / "trust" / "fleet.pub").write_text(public_key_text(keys.public))
    store = open_store(data / "hub.db")
    reg = Registry(store, RegistryConfig(), data)
    reg.push(iter([kestrel_pb2.PushChunk(data=b, total_size=len(b), sha256=hashlib.sha256(b).hexdigest())
                   for b in [make_bundle(models_dir / "brightness_int8.tflite", keys, version=3)]]))
    order = []
    store.upsert_device("cam-1", group="lab", reported_model="brightness", reported_version=3,
                        previous_version=2, desired_model="brightness", desired_version=2, desired_scope="group")
    store.set_group_desired("lab", "brightness", 2, False, 1)

    def refuse(topic: str, payload: bytes) -> None:
        order.append(("publish", store.get_device("cam-1").desired_version))  # type: ignore[union-attr]
        raise TransportError("injected: broker gone")

    fleet = FleetService(store, reg, refuse)
    with pytest.raises(TransportError):
        fleet.deploy("brightness", 3, device_id="cam-1")
    with pytest.raises(TransportError):
        fleet.deploy("brightness", 3, group="lab")
    with pytest.raises(TransportError):
        fleet.rollback(group="lab")
    assert order == [("publish", 3), ("publish", 3), ("publish", 2)]  # recorded when the publish was tried
    dev = store.get_device("cam-1")
    assert dev is not None and (dev.desired_model, dev.desired_version, dev.desired_scope) == (
        "brightness", 2, "group")  # ... and put back when it failed
    assert store.get_group_desired("lab") == GroupDesired("lab", "brightness", 2, False, 1)
    store.close()
