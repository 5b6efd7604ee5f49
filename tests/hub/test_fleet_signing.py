"""Signed desired state on the hub side: deploy and rollback are signed by the fleet key for their
topic with rising sequences; the renewer re-signs the hub's own retained messages before they
expire (and after a fleet key rotation), never anything else it finds on the broker."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List

import paho.mqtt.client as mqtt
import pytest

from hub.broker import BrokerTarget
from hub.errors import TransportError
from hub.fleet import FleetService
from hub.registry import Registry, RegistryConfig
from hub.security.fleetkey import FLEET_KEY, FleetSigner
from hub.security.refresh import Renewer
from hub.store.open import open_store
from proto import desired, kestrel_pb2, topics
from proto.keys import load_public_keys, public_key_text
from tests.helpers.bundles import make_bundle, make_keypair
from tests.helpers.fleet import signed
from tests.helpers.mqtt import Collector
from tests.helpers.wait import wait_for


def _topic(kind: str = "groups") -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    return topics.group_desired(name) if kind == "groups" else topics.device_desired(name)


def test_deploy_and_rollback_are_signed_for_their_topic(tmp_path: Path, models_dir: Path) -> None:
    keys = make_keypair(tmp_path, "signing")
    data = tmp_path / "hub"
    (data / "trust").mkdir(parents=True)
    (data / "trust" / "signing.pub").write_text(public_key_text(keys.public))
    signer = FleetSigner(data / "security")
    published: List[tuple] = []
    store = open_store(data / "hub.db")
    try:
        reg = Registry(store, RegistryConfig(), data)
        fleet = FleetService(store, reg, lambda t, p: published.append((t, p)), signer=signer)
        bundle = make_bundle(models_dir / "brightness_int8.tflite", keys, version=3)
        reg.push([kestrel_pb2.PushChunk(data=bundle, total_size=len(bundle),
                                        sha256=hashlib.sha256(bundle).hexdigest())])
        fleet.deploy("brightness", 3, group="lobby")
        store.upsert_device("cam-1", reported_model="brightness", reported_version=3, previous_version=2)
        fleet.rollback(device_id="cam-1")
        fleet.rollback(group="lobby")
        last = signer.last_signed(topics.group_desired("lobby"))

        def broker_down(topic: str, payload: bytes) -> None:
            raise TransportError("broker down (test)")

        with pytest.raises(TransportError):
            FleetService(store, reg, broker_down, signer=signer).deploy("brightness", 3, group="lobby")
        # what was not published is not our last word: the retained rollback is still the one renewed
        assert signer.last_signed(topics.group_desired("lobby")) == last
    finally:
        store.close()
    trusted = load_public_keys(data / "security" / "fleet.pub")
    assert signer.key_id not in {keys.key_id}  # the fleet key is not the model-signing key
    now = int(time.time() * 1000)
    seqs = []
    for topic, payload in published:
        msg = kestrel_pb2.DesiredState.FromString(payload)
        assert desired.verify(topic, msg, trusted, now_ms=now) == signer.key_id
        assert msg.expires_ms > now + 6 * 86400 * 1000  # the default: a week
        seqs.append(msg.sequence)
    assert [t for t, _ in published] == [topics.group_desired("lobby"), topics.device_desired("cam-1"),
                                         topics.group_desired("lobby")]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    # a restarted hub (a new signer on the same directory) goes on above the last sequence
    assert FleetSigner(data / "security").next_sequence() > seqs[-1]


@pytest.fixture
def renewer_rig(tmp_path: Path, broker: Any) -> Iterator[Dict[str, Any]]:
    signer = FleetSigner(tmp_path / "sec", ttl_s=100.0)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    now = [time.time()]
    renewer = Renewer(BrokerTarget(host=broker.host, port=broker.port), f"renew-{uuid.uuid4().hex[:8]}", signer,
                      interval_s=3600, clock=lambda: now[0]).start()
    assert renewer.wait_subscribed()
    retained: List[str] = []

    def publish(topic: str, payload: bytes) -> None:
        retained.append(topic)
        pub.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)

    yield {"signer": signer, "renewer": renewer, "publish": publish, "now": now, "tmp": tmp_path, "broker": broker}
    renewer.stop()
    for t in retained:
        pub.publish(t, b"", qos=1, retain=True).wait_for_publish(10)
    pub.loop_stop()
    pub.disconnect()


def _order(version: int) -> kestrel_pb2.DesiredState:
    return kestrel_pb2.DesiredState(model_name="m", version=version, sha256="cd" * 32, size=10, issued_ms=1)


def test_the_renewer_re_signs_only_the_hubs_own_last_message(renewer_rig: Dict[str, Any]) -> None:
    signer, renewer, publish, now = (renewer_rig[k] for k in ("signer", "renewer", "publish", "now"))
    ours, replayed, forged = _topic(), _topic(), _topic("devices")

    def announce(topic: str, msg: kestrel_pb2.DesiredState) -> bytes:
        """What FleetService does: sign, publish retained, record it as our last word on the topic."""
        signer.sign(topic, msg)
        publish(topic, msg.SerializeToString())
        signer.published(topic, msg)
        return msg.SerializeToString()

    old_order = announce(replayed, _order(1))
    announce(replayed, _order(2))  # the hub's last word on `replayed`; then...
    publish(replayed, old_order)  # ...an attacker puts the older message of ours back as the retained one
    announce(ours, _order(5))
    publish(forged, signed(forged, _order(9), make_keypair(renewer_rig["tmp"], "intruder")))
    wait_for(lambda: len(renewer._latest) >= 3, 10, what="the renewer saw the three retained messages")
    original = renewer._latest[ours]
    assert renewer.renew_once() == 0  # all fresh
    now[0] += 60  # past half of their 100 s life
    assert renewer.due(int(now[0] * 1000)) == [ours]  # never the replayed one, never the forged one
    col = Collector(renewer_rig["broker"].host, renewer_rig["broker"].port, [ours])
    try:
        assert renewer.renew_once() == 1
        wait_for(lambda: len(col.payloads()) >= 2, 10, what="the renewed message after the retained one")
        renewed = kestrel_pb2.DesiredState.FromString(col.payloads()[-1])
    finally:
        col.close()
    assert renewed.version == original.version == 5 and renewed.sequence > original.sequence
    assert renewed.expires_ms > original.expires_ms
    assert desired.verify(ours, renewed, {signer.key_id: signer.key.public_key()}, now_ms=int(now[0] * 1000))
    assert signer.last_signed(ours) == desired.digest(ours, renewed)


def test_a_fleet_key_rotation_re_signs_the_retained_orders_with_the_new_key(renewer_rig: Dict[str, Any]) -> None:
    signer, renewer, publish = (renewer_rig[k] for k in ("signer", "renewer", "publish"))
    topic = _topic()
    msg = signer.sign(topic, _order(4))
    publish(topic, msg.SerializeToString())
    signer.published(topic, msg)
    wait_for(lambda: topic in renewer._latest, 10, what="the renewer saw it")
    old_id = signer.key_id
    new_dir = renewer_rig["tmp"] / "new"
    rotated = FleetSigner(new_dir)  # the operator's new key...
    (renewer_rig["tmp"] / "sec" / FLEET_KEY).unlink()
    (renewer_rig["tmp"] / "sec" / FLEET_KEY).write_bytes((new_dir / FLEET_KEY).read_bytes())
    (renewer_rig["tmp"] / "sec" / FLEET_KEY).chmod(0o600)
    renewer.signer = FleetSigner(renewer_rig["tmp"] / "sec", ttl_s=100.0)  # ...in place: the hub restarts with it
    assert renewer.signer.key_id == rotated.key_id != old_id
    assert renewer.renew_once() == 1
    wait_for(lambda: renewer._latest[topic].key_id == rotated.key_id, 10, what="re-signed with the new key")
    assert renewer._latest[topic].version == 4


def test_fleet_key_rotation_devices_trust_both_keys_meanwhile(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from edge import config as edgeconfig
    from edge.updater.desiredgate import DesiredGate
    from edge.updater.state import StateFile
    from tests.hub import REPO

    toml = tmp_path / "hub.toml"
    toml.write_text(f'[hub]\ndata_dir = "{tmp_path / "hub"}"\n')
    sec = tmp_path / "hub" / "security"

    def cli(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "hub", "fleet-key", *args, "--config", str(toml), "--json"],
                           cwd=str(REPO), capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
                           timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def gate(name: str, pub_text: str) -> DesiredGate:
        (tmp_path / f"{name}.pub").write_text(pub_text)
        upd = edgeconfig.UpdateConfig(fleet_keys=[str(tmp_path / f"{name}.pub")])
        return DesiredGate(upd, StateFile(tmp_path / name / "state.json"), lambda: (time.time(), True))

    old = FleetSigner(sec)
    device_old = gate("old", old.public_text)  # a device enrolled before the rotation
    topic = _topic()
    assert device_old.check(topic, old.sign(topic, _order(1)).SerializeToString())[0]
    rotating = json.loads(cli("rotate"))
    assert rotating["fleet_key_id"] == old.key_id and rotating["next_key_id"]
    both = FleetSigner(sec).public_text  # what identity bundles now ship as fleet.pub
    assert len(both.splitlines()) == 2
    device_new = gate("both", both)  # given the new fleet.pub
    assert device_new.check(topic, FleetSigner(sec).sign(topic, _order(2)).SerializeToString())[0]
    done = json.loads(cli("finish"))
    assert done["fleet_key_id"] == rotating["next_key_id"] and not done["next_key_id"]
    new = FleetSigner(sec)
    msg = new.sign(topic, _order(3)).SerializeToString()
    assert device_new.check(topic, msg)[0]
    assert device_old.check(topic, msg) == (False, None) and device_old.refused == {desired.UNTRUSTED_KEY: 1}
    assert sorted(p.name.split("-", 1)[1] for p in (sec / "retired").iterdir()) == ["fleet.key", "fleet.pub"]
