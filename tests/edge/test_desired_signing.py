"""Signed desired state on the device (issue 11): the gate every desired-state message passes
(edge.updater.desiredgate) and the real ``kestrel-edge run`` against a real Mosquitto, ignoring and
counting unsigned, wrong-key, replayed and expired messages, retained or live."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from edge import config, credentials
from edge.updater.desiredgate import STATE_KEY, DesiredGate
from edge.updater.state import StateFile
from proto import desired, kestrel_pb2, topics
from proto.errors import ConfigError
from tests.helpers.broker import free_port
from tests.helpers.fleet import fleet_keypair, signed
from tests.helpers.mqtt import Collector
from tests.helpers.wait import wait_for

NOW_MS = 1_800_000_000_000
GROUP_TOPIC = topics.group_desired("lobby")
DEVICE_TOPIC = topics.device_desired("cam-1")


def deploy(version: int = 2) -> kestrel_pb2.DesiredState:
    return kestrel_pb2.DesiredState(model_name="brightness", version=version, sha256="ab" * 32, size=1000,
                                    issued_ms=NOW_MS - 1000)


def gate_for(tmp_path: Path, keys: List[str], *, require: bool = True, now_ms: int = NOW_MS,
             slack_s: float = 0.0) -> Tuple[DesiredGate, Dict[str, int]]:
    upd = config.UpdateConfig(fleet_keys=keys, require_signed_desired=require, clock_slack_s=slack_s)
    counted: Dict[str, int] = {}

    def count(reason: str) -> None:
        counted[reason] = counted.get(reason, 0) + 1

    state = StateFile(tmp_path / "update" / "state.json")
    return DesiredGate(upd, state, lambda: (now_ms / 1000.0, True), count), counted


def test_a_signed_message_passes_and_every_kind_of_forgery_is_refused_and_counted(tmp_path: Path) -> None:
    fleet, other = fleet_keypair(tmp_path), fleet_keypair(tmp_path, name="intruder")
    model_key = fleet_keypair(tmp_path, name="signing")  # the model-signing key is not a fleet key
    gate, counted = gate_for(tmp_path, [str(fleet.pub_path)])
    ok = signed(GROUP_TOPIC, deploy(), fleet, sequence=10, expires_ms=NOW_MS + 60_000)
    accepted, msg = gate.check(GROUP_TOPIC, ok)
    assert accepted and msg.version == 2 and msg.sequence == 10
    tampered = kestrel_pb2.DesiredState.FromString(ok)
    tampered.version = 99  # same signature, other content
    cases = [
        (deploy().SerializeToString(), desired.UNSIGNED),
        (b"", desired.UNSIGNED),  # clearing the group's order is not allowed to anyone
        (signed(GROUP_TOPIC, deploy(), other, sequence=11, expires_ms=NOW_MS + 60_000), desired.UNTRUSTED_KEY),
        (signed(GROUP_TOPIC, deploy(), model_key, sequence=11, expires_ms=NOW_MS + 60_000),
         desired.UNTRUSTED_KEY),
        (tampered.SerializeToString(), desired.BAD_SIGNATURE),
        # signed for another group (or a device), replayed on this topic
        (signed(topics.group_desired("vip"), deploy(), fleet, sequence=12, expires_ms=NOW_MS + 60_000),
         desired.BAD_SIGNATURE),
        (signed(GROUP_TOPIC, deploy(), fleet, sequence=9, expires_ms=NOW_MS + 60_000), desired.REPLAYED),
        (signed(GROUP_TOPIC, deploy(3), fleet, sequence=10, expires_ms=NOW_MS + 60_000), desired.REPLAYED),
        (signed(GROUP_TOPIC, deploy(), fleet, sequence=13, expires_ms=NOW_MS - 1), desired.EXPIRED),
        (b"\xff\xff\xff", desired.MALFORMED),
    ]
    for payload, reason in cases:
        before = dict(counted)
        assert gate.check(GROUP_TOPIC, payload) == (False, None), reason
        assert counted.get(reason, 0) == before.get(reason, 0) + 1, (reason, counted)
    assert gate.check(GROUP_TOPIC, ok)[0]  # the accepted message again (a redelivered retained one)
    assert gate.check(DEVICE_TOPIC, signed(DEVICE_TOPIC, deploy(), fleet, sequence=5,
                                           expires_ms=NOW_MS + 1))[0]  # per topic: 5 is fine here
    assert sum(counted.values()) == len(cases)


def test_the_last_accepted_sequence_survives_a_restart(tmp_path: Path) -> None:
    fleet = fleet_keypair(tmp_path)
    gate, _ = gate_for(tmp_path, [str(fleet.pub_path)])
    first = signed(GROUP_TOPIC, deploy(), fleet, sequence=100, expires_ms=NOW_MS + 60_000)
    assert gate.check(GROUP_TOPIC, first)[0]
    stored = json.loads((tmp_path / "update" / "state.json").read_text())[STATE_KEY][GROUP_TOPIC]
    assert stored[0] == 100
    again, counted = gate_for(tmp_path, [str(fleet.pub_path)])  # a new daemon reads the state file
    older = signed(GROUP_TOPIC, deploy(), fleet, sequence=50, expires_ms=NOW_MS + 60_000)
    assert again.check(GROUP_TOPIC, older) == (False, None) and counted == {desired.REPLAYED: 1}
    assert again.check(GROUP_TOPIC, first)[0]  # the retained message itself, after the restart


def test_expiry_allows_the_clock_slack_and_no_key_refuses_everything(tmp_path: Path) -> None:
    fleet = fleet_keypair(tmp_path)
    late = signed(GROUP_TOPIC, deploy(), fleet, sequence=1, expires_ms=NOW_MS - 5_000)
    gate, _ = gate_for(tmp_path / "a", [str(fleet.pub_path)], slack_s=10.0)
    assert gate.check(GROUP_TOPIC, late)[0]
    bare, counted = gate_for(tmp_path / "b", [])  # a device given no fleet key (the default is to require one)
    assert bare.check(GROUP_TOPIC, late) == (False, None) and counted == {desired.NO_FLEET_KEY: 1}


def test_unsigned_messages_pass_only_when_the_config_says_so(tmp_path: Path) -> None:
    fleet = fleet_keypair(tmp_path)
    gate, counted = gate_for(tmp_path, [str(fleet.pub_path)], require=False)
    assert gate.check(GROUP_TOPIC, deploy().SerializeToString())[0]
    assert gate.check(GROUP_TOPIC, b"") == (True, None)  # a clear
    forged = kestrel_pb2.DesiredState.FromString(signed(GROUP_TOPIC, deploy(), fleet, sequence=1,
                                                        expires_ms=NOW_MS + 1000))
    forged.version = 7
    assert gate.check(GROUP_TOPIC, forged.SerializeToString()) == (False, None)  # signed ones still checked
    assert counted == {desired.BAD_SIGNATURE: 1}
    assert config.UpdateConfig().require_signed_desired  # the secure path is the default


def test_a_fleet_key_file_that_is_not_a_key_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.pub"
    bad.write_text("not a key\n")
    with pytest.raises(ConfigError, match=r"\[update\] fleet_keys"):
        gate_for(tmp_path, [str(bad)])


def test_fleet_keys_and_secrets_are_found_in_the_credentials_directory(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    creds = tmp_path / "creds"
    fleet = fleet_keypair(creds)
    rel = str(fleet.pub_path.relative_to(creds))
    monkeypatch.setenv(credentials.CREDENTIALS_ENV, str(creds))
    monkeypatch.chdir(tmp_path)
    gate, _ = gate_for(tmp_path, [rel])
    assert fleet.key_id in gate.keys
    (creds / "mqtt-password").write_text("s3cret\n")
    (creds / "mqtt-password").chmod(0o640)
    assert credentials.read_secret("mqtt-password") == "s3cret"
    assert credentials.credential_path("/abs/elsewhere") == "/abs/elsewhere"  # absolute names are taken as they are
    (creds / "mqtt-password").chmod(0o644)
    with pytest.raises(ConfigError, match="readable by everyone"):
        credentials.read_secret("mqtt-password")


# ---- the real daemon ---------------------------------------------------------------------------

def _metrics(port: int) -> Dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for m in re.finditer(r'^kestrel_edge_desired_refused_total\{reason="(\w+)"\} (\S+)$', text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def test_the_real_daemon_ignores_and_counts_forged_replayed_and_expired_desired_state(tmp_path, broker):  # noqa: ANN001
    """A fresh device (no model yet) following its desired topics on a real broker open to anyone:
    a retained unsigned order on its group's topic is there before it starts; then a wrong-key order on
    its own topic, a valid one (followed: it starts downloading), that one's sequence replayed, and an
    expired one. Only the valid one is acted on; the others are counted by reason in /metrics and in
    its telemetry, and its log never says the hub ordered them."""
    import paho.mqtt.client as mqtt

    from tests.edge.test_daemon import daemon_cmd, env, write_toml

    device, group = "cam-sig-1", "lobby-sig"
    fleet, intruder = fleet_keypair(tmp_path), fleet_keypair(tmp_path, name="intruder")
    dtopic, gtopic = topics.device_desired(device), topics.group_desired(group)
    port = free_port()
    src = '[source]\nkind = "testpattern"'
    toml = write_toml(tmp_path, device, broker.port, src, tmp_path, model='path = ""',
                      extra=f'[update]\nhub_grpc = "127.0.0.1:1"\ntrust_dir = "{tmp_path}"\n'
                            f'fleet_keys = ["{fleet.pub_path}"]\n')
    text = toml.read_text().replace("enabled = false", "enabled = true")
    text = re.sub(r"metrics_port = \d+", f"metrics_port = {port}", text)
    text = re.sub(r"interval_s = [\d.]+", "interval_s = 0.3", text)
    toml.write_text(text.replace(f'id = "{device}"', f'id = "{device}"\ngroup = "{group}"'))
    hub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    hub.connect(broker.host, broker.port)
    hub.loop_start()

    def publish(topic: str, payload: bytes) -> None:
        hub.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)

    publish(gtopic, deploy(5).SerializeToString())  # retained, unsigned, waiting for the device
    col = Collector(broker.host, broker.port, [topics.telemetry(device)], qos=0)
    proc = subprocess.Popen(daemon_cmd(toml), env=env(), cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        def refused(reason: str, n: int = 1) -> bool:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                return _metrics(port).get(reason, 0) >= n
            except OSError:
                return False

        wait_for(lambda: refused(desired.UNSIGNED), 30, what="the retained unsigned order refused")
        publish(dtopic, signed(dtopic, deploy(6), intruder))
        wait_for(lambda: refused(desired.UNTRUSTED_KEY), 15, what="the wrong-key order refused")
        good = signed(dtopic, deploy(7), fleet, sequence=1000)
        publish(dtopic, good)
        state_file = tmp_path / "data" / "update" / "state.json"

        def followed() -> bool:
            assert proc.poll() is None
            try:
                return json.loads(state_file.read_text()).get("target_version") == 7
            except (OSError, ValueError):
                return False

        wait_for(followed, 15, what="the valid order followed (download attempted)")
        publish(dtopic, signed(dtopic, deploy(8), fleet, sequence=999))
        wait_for(lambda: refused(desired.REPLAYED), 15, what="the replayed sequence refused")
        two_days_ago = int((time.time() - 2 * 86400) * 1000)  # beyond the default clock slack (1 day)
        publish(dtopic, signed(dtopic, deploy(9), fleet, sequence=1001, expires_ms=two_days_ago))
        wait_for(lambda: refused(desired.EXPIRED), 15, what="the expired order refused")
        # (a reconnect on a loaded machine redelivers the retained ones: counted again, hence >= 1)
        expected = {desired.UNSIGNED, desired.UNTRUSTED_KEY, desired.REPLAYED, desired.EXPIRED}
        assert {k for k, v in _metrics(port).items() if v} == expected

        def telemetry_counts() -> Dict[str, int]:
            for p in reversed(col.payloads("/telemetry")):
                t = kestrel_pb2.Telemetry.FromString(p)
                if set(t.desired_refused) == expected:
                    return dict(t.desired_refused)
            return {}

        assert all(n >= 1 for n in wait_for(telemetry_counts, 15, what="telemetry with the refusals").values())
        assert json.loads(state_file.read_text())["target_version"] == 7  # none of them was acted on
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        col.close()
        for t in (dtopic, gtopic):
            publish(t, b"")
        hub.loop_stop()
        hub.disconnect()
    assert proc.returncode == 0, err[-3000:]
    lines = [ln for ln in err.splitlines() if "ignored a desired-state message" in ln]
    assert len(lines) == 4 and not any("ordered by the hub" in ln for ln in lines), lines
    assert "brightness v5" not in err and "brightness v6" not in err
