"""The MQTT publisher against a real Mosquitto: order, QoS, retained status + last will, resubscribe,
durability across broker outages and publisher restarts, flush on stop, auth refusal, oversize.

Some tests drive a publisher in a subprocess (``python -m tests.edge.test_publisher ...``, see
``child_main`` at the bottom) so it can be SIGKILLed or SIGSTOPped like a real daemon.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import paho.mqtt.client as paho
import pytest

from edge.config import EdgeConfig
from edge.errors import AuthError
from edge.uplink.publisher import Publisher
from proto import kestrel_pb2, topics
from tests.edge.conftest import publisher_for
from tests.helpers.broker import Mosquitto
from tests.helpers.mqtt import Collector
from tests.helpers.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
FAST = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.3, "ack_timeout_s": 2.0, "keepalive_s": 5,
        "auth_retry_s": 60.0}


def make_cfg(host: str, port: int, **mqtt: object) -> EdgeConfig:
    cfg = EdgeConfig()
    cfg.mqtt.host = host
    cfg.mqtt.port = port
    for k, v in {**FAST, **mqtt}.items():
        setattr(cfg.mqtt, k, v)
    return cfg


def frame(i: int, device: str, size: int = 64) -> kestrel_pb2.Frame:
    return kestrel_pb2.Frame(frame_id=f"{device}-{i}", device_id=device, capture_time_ms=1000 + i,
                             image=bytes([i % 256]) * size, image_format="jpeg", source="cam0")


class QosCollector(Collector):
    """A Collector that also remembers the delivered QoS of each message."""

    def __init__(self, *args: object, **kw: object) -> None:
        self.qos_seen: List[int] = []
        super().__init__(*args, **kw)  # type: ignore[arg-type]

    def _on_message(self, client, userdata, msg):  # noqa: ANN001
        with self._lock:
            self.qos_seen.append(msg.qos)
        super()._on_message(client, userdata, msg)


def decode_frames(payloads: List[bytes]) -> List[kestrel_pb2.Frame]:
    return [kestrel_pb2.Frame.FromString(p) for p in payloads]


def decode_status(payload: bytes) -> kestrel_pb2.Status:
    return kestrel_pb2.Status.FromString(payload)


@pytest.fixture
def publishers():  # noqa: ANN201
    made: List[Publisher] = []

    def make(cfg: EdgeConfig, device: str, spool: Path) -> Publisher:
        p = publisher_for(cfg, device, spool)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop(flush_timeout_s=0)


class Child:
    """A publisher in a subprocess, driven line by line over stdin/stdout."""

    def __init__(self, cfg: Dict[str, object], device: str, spool: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        argv = [sys.executable, "-m", "tests.edge.test_publisher", json.dumps(cfg), device, str(spool)]
        self.log = spool.parent / f"child-{os.getpid()}-{id(self)}.log"
        with open(self.log, "w") as err:  # a file, not a pipe nobody drains
            self.proc = subprocess.Popen(argv, cwd=str(REPO), env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.reply() == "ready"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def reply(self, timeout: float = 20.0) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"child did not answer; its log:\n{self.log.read_text()}") from None

    def ask(self, cmd: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def children():  # noqa: ANN201
    made: List[Child] = []

    def make(cfg: Dict[str, object], device: str, spool: Path) -> Child:
        c = Child(cfg, device, spool)
        made.append(c)
        return c

    yield make
    for c in made:
        try:
            os.kill(c.proc.pid, signal.SIGCONT)
        except OSError:
            pass
        c.close()


def child_cfg(host: str, port: int, **mqtt: object) -> Dict[str, object]:
    return {"host": host, "port": port, **FAST, **mqtt}


# --------------------------------------------------------------------------------------------------


def test_frames_arrive_as_protobuf_in_order_at_qos1(broker, tmp_path: Path, publishers) -> None:  # noqa: ANN001
    dev = "order1"
    col = QosCollector(broker.host, broker.port, [topics.frames(dev)], qos=1)
    try:
        pub = publishers(make_cfg(broker.host, broker.port, max_inflight=4), dev, tmp_path / "spool")
        pub.start()
        sent = [frame(i, dev) for i in range(30)]
        for f in sent:
            pub.publish_frame(f)
        assert [f.sequence for f in sent] == list(range(30))
        got = decode_frames(col.wait_count(30, "/frames"))
        assert [f.frame_id for f in got] == [f.frame_id for f in sent]
        assert [f.sequence for f in got] == list(range(30))
        assert got[3].image == sent[3].image and got[3].image_bytes == 64
        assert {t for t, _, _ in col.messages} == {topics.frames(dev)}
        assert set(col.qos_seen) == {1}
        wait_for(lambda: pub.spool_stats()[1] == 0, 10, what="spool drained after PUBACKs")
        assert pub.frames_acked == 30
    finally:
        col.close()


def test_birth_online_retained_and_last_will_offline_on_sigkill(broker, tmp_path: Path, children) -> None:  # noqa: ANN001
    dev = "lwt1"
    col = Collector(broker.host, broker.port, [topics.status(dev)])
    try:
        child = children(child_cfg(broker.host, broker.port), dev, tmp_path / "spool")
        wait_for(lambda: child.ask("connected") == "connected 1", 10, what="child connected")
        first = decode_status(col.wait_count(1, "/status")[0])
        assert first.state == "online" and first.device_id == dev
        assert first.group == "g-test"  # from the child's status provider
        # a late subscriber gets the retained birth
        late = Collector(broker.host, broker.port, [topics.status(dev)])
        try:
            late.wait_count(1, "/status")
            t, payload, retained = late.messages[0]
            assert retained and decode_status(payload).state == "online"
        finally:
            late.close()
        child.kill()  # no DISCONNECT: the broker must publish our last will
        payloads = col.wait_count(2, "/status")
        will = decode_status(payloads[1])
        assert will.state == "offline" and will.device_id == dev and will.group == "g-test"
        late = Collector(broker.host, broker.port, [topics.status(dev)])
        try:
            late.wait_count(1, "/status")
            assert late.messages[0][2] is True and decode_status(late.messages[0][1]).state == "offline"
        finally:
            late.close()
    finally:
        col.close()


def test_subscription_survives_broker_restart(broker_factory, tmp_path: Path, publishers) -> None:  # noqa: ANN001
    b = broker_factory()
    dev = "resub1"
    got: List[Tuple[str, bytes]] = []
    pub = publishers(make_cfg(b.host, b.port), dev, tmp_path / "spool")
    pub.subscribe(topics.device_desired(dev), lambda t, p: got.append((t, p)), qos=1)
    pub.start()
    wait_for(lambda: pub.connected, 10, what="publisher connected")

    def send(payload: bytes) -> None:
        c = paho.Client(paho.CallbackAPIVersion.VERSION2)
        c.connect(b.host, b.port)
        c.loop_start()
        c.publish(topics.device_desired(dev), payload, qos=1).wait_for_publish(5)
        c.loop_stop()
        c.disconnect()

    wait_for(lambda: (send(b"one") or True) and bool(got), 10, interval=0.3, what="first message")
    connections = pub.mqtt.connections
    b.stop()
    wait_for(lambda: not pub.connected, 10, what="publisher noticed the broker is gone")
    b.start()
    wait_for(lambda: pub.connected and pub.mqtt.connections > connections, 10, what="publisher reconnected")
    got.clear()
    wait_for(lambda: (send(b"two") or True) and bool(got), 10, interval=0.3, what="message after restart")
    assert got[0] == (topics.device_desired(dev), b"two")
    # the restarted broker lost every retained message: the birth after reconnect restores "online"
    col = Collector(b.host, b.port, [topics.status(dev)])
    try:
        _, payload, retained = wait_for(lambda: col.messages[:1], 10, what="retained birth")[0]
        assert retained and decode_status(payload).state == "online"
    finally:
        col.close()


def test_every_frame_exactly_once_in_order_across_outage_and_restart(broker_factory, tmp_path: Path,
                                                                    children) -> None:  # noqa: ANN001
    b = broker_factory()
    dev = "outage1"
    spool = tmp_path / "spool"
    cfg = child_cfg(b.host, b.port)
    sub_id = "hub-test-outage1"
    col1 = Collector(b.host, b.port, [topics.frames(dev)], client_id=sub_id)
    c1 = children(cfg, dev, spool)
    for i in range(5):
        assert c1.ask(f"frame {i}") == f"seq {i}"
    col1.wait_count(5, "/frames")
    wait_for(lambda: c1.ask("spool") == "spool 0", 10, what="phase-1 frames acknowledged")
    col1.close()
    b.stop()
    for i in range(5, 10):  # broker down: spooled durably before publish_frame returns
        assert c1.ask(f"frame {i}") == f"seq {i}"
    c1.kill()  # the daemon dies hard with 5 frames unsent
    c2 = children(cfg, dev, spool)  # restarted on the same spool, broker still down
    for i in range(10, 15):
        assert c2.ask(f"frame {i}") == f"seq {i}"  # the sequence continues, no reuse
    assert c2.ask("spool") == "spool 10"
    os.kill(c2.proc.pid, signal.SIGSTOP)  # hold the publisher until the subscriber is back
    b.start()
    col2 = Collector(b.host, b.port, [topics.frames(dev)], client_id=sub_id)
    try:
        os.kill(c2.proc.pid, signal.SIGCONT)
        col2.wait_count(10, "/frames", timeout=30)
        for i in range(15, 20):  # live again
            assert c2.ask(f"frame {i}") == f"seq {i}"
        col2.wait_count(15, "/frames", timeout=30)
        wait_for(lambda: c2.ask("spool") == "spool 0", 10, what="spool drained")
        assert c2.ask("stop 2") == "stopped 0"
        got = decode_frames(col1.payloads("/frames") + col2.payloads("/frames"))
        ids = [f.frame_id for f in got]
        assert sorted(ids) == sorted(f"{dev}-{i}" for i in range(20))
        assert len(ids) == len(set(ids)), "a frame arrived twice"
        assert [f.sequence for f in got] == list(range(20))
    finally:
        col2.close()


def test_stop_flushes_frames_published_right_before(broker, tmp_path: Path) -> None:  # noqa: ANN001
    dev = "flush1"
    col = Collector(broker.host, broker.port, [topics.frames(dev), topics.status(dev)])
    try:
        pub = publisher_for(make_cfg(broker.host, broker.port, max_inflight=2), dev, tmp_path / "spool")
        pub.start()
        wait_for(lambda: pub.connected, 10, what="connected")
        for i in range(40):
            pub.publish_frame(frame(i, dev, size=2000))
        pub.stop(flush_timeout_s=20)
        assert pub.spool_stats()[1] == 0
        assert [f.sequence for f in decode_frames(col.wait_count(40, "/frames"))] == list(range(40))
        states = [decode_status(p).state for p in col.wait_count(2, "/status")]
        assert states[0] == "online" and states[-1] == "offline"
    finally:
        col.close()


def test_unsent_frames_stay_in_spool_when_broker_is_down(tmp_path: Path) -> None:
    from tests.helpers.broker import free_port

    dev = "down1"
    pub = publisher_for(make_cfg("127.0.0.1", free_port()), dev, tmp_path / "spool")
    pub.start()
    for i in range(3):
        pub.publish_frame(frame(i, dev))
    tel = kestrel_pb2.Telemetry(device_id=dev)
    pub.publish_telemetry(tel)
    assert pub.telemetry_dropped == 1
    wait_for(lambda: pub.mqtt.connect_attempts >= 2, 10, what="reconnect attempts")
    pub.stop(flush_timeout_s=5)
    assert pub.spool_stats()[1] == 3
    again = publisher_for(make_cfg("127.0.0.1", free_port()), dev, tmp_path / "spool")
    assert again.spool_stats()[1] == 3 and again.spool.next_sequence == 3


@pytest.fixture
def auth_broker(tmp_path: Path):  # noqa: ANN201
    """broker_factory(users=...) but also usable as root: mosquitto run as root drops to the user
    "mosquitto", which cannot read the 0600 password file in pytest's root-only tmp dir (the lead is
    asked to add ``user root`` under euid 0 in tests/helpers/broker.py; then this becomes broker_factory)."""
    b = Mosquitto(tmp_path / "mosq-auth", users={"u": "p"})
    if hasattr(os, "geteuid") and os.geteuid() == 0 and "user root" not in b.conf.read_text():
        b.conf.write_text(b.conf.read_text() + "user root\n")
    yield b.start()
    b.stop()


def test_auth_refused_is_one_error_and_no_tight_loop(auth_broker, tmp_path: Path, publishers,
                                                     caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    b = auth_broker
    (tmp_path / "bad").write_text("wrong\n")
    (tmp_path / "good").write_text("p\n")
    for secret in ("bad", "good"):
        (tmp_path / secret).chmod(0o600)  # a secret everyone may read is refused (tests/edge/test_desired_signing.py)
    with caplog.at_level(logging.INFO, logger="edge"):
        bad = publishers(make_cfg(b.host, b.port, username="u", password_file=str(tmp_path / "bad")), "auth1",
                         tmp_path / "s1")
        bad.start()
        wait_for(lambda: bad.state == "auth_failed", 10, what="auth_failed state")
        assert isinstance(bad.last_error, AuthError)
        assert "refused our credentials" in str(bad.last_error)
        # not a tight loop: the next attempt is scheduled auth_retry_s (60 s) later, not reconnect_min_s
        wait_for(lambda: bad.mqtt.next_attempt_at > 0, 5, what="the next attempt scheduled")
        assert bad.mqtt.next_attempt_at - time.monotonic() > 50.0
        assert bad.mqtt.connect_attempts == 1
        assert not bad.connected
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "refused our credentials" in errors[0].getMessage()
    assert b.log.read_text().count("not authorised") == 1
    good = publishers(make_cfg(b.host, b.port, username="u", password_file=str(tmp_path / "good")), "auth2",
                      tmp_path / "s2")
    good.start()
    wait_for(lambda: good.connected, 10, what="good credentials connect")


def test_oversize_frame_is_refused_and_counted(broker, tmp_path: Path, publishers,
                                              caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    dev = "big1"
    col = Collector(broker.host, broker.port, [topics.frames(dev)])
    try:
        pub = publishers(make_cfg(broker.host, broker.port, max_payload_bytes=1000), dev, tmp_path / "spool")
        pub.start()
        with caplog.at_level(logging.ERROR, logger="edge.uplink.publisher"):
            big = frame(0, dev, size=5000)
            pub.publish_frame(big)
        assert pub.oversize_refused == 1 and pub.spool_stats()[1] == 0
        assert any("max_payload_bytes=1000" in r.getMessage() for r in caplog.records)
        small = frame(1, dev, size=10)
        pub.publish_frame(small)
        got = decode_frames(col.wait_count(1, "/frames"))
        assert [(f.frame_id, f.sequence) for f in got] == [(f"{dev}-1", 0)]
    finally:
        col.close()


def test_missing_puback_reconnects_and_resends_without_loss(broker_factory, tmp_path: Path, publishers,
                                                            caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    b = broker_factory()
    dev = "puback1"
    col = Collector(b.host, b.port, [topics.frames(dev)], client_id="hub-test-puback1")
    try:
        pub = publishers(make_cfg(b.host, b.port, ack_timeout_s=0.5, max_inflight=3), dev, tmp_path / "spool")
        pub.start()
        wait_for(lambda: pub.connected, 10, what="connected")
        pub.publish_frame(frame(0, dev))
        col.wait_count(1, "/frames")
        connections = pub.mqtt.connections
        assert b.proc is not None
        os.kill(b.proc.pid, signal.SIGSTOP)  # the broker hangs: the socket stays open, no PUBACK comes
        try:
            for i in range(1, 6):
                pub.publish_frame(frame(i, dev))
            with caplog.at_level(logging.WARNING, logger="edge.uplink.mqtt"):
                wait_for(lambda: not pub.connected, 10, what="link declared broken on missing PUBACK")
            assert any("no PUBACK" in r.getMessage() for r in caplog.records)
        finally:
            os.kill(b.proc.pid, signal.SIGCONT)
        wait_for(lambda: pub.mqtt.connections > connections, 15, what="reconnected")
        wait_for(lambda: pub.spool_stats()[1] == 0, 15, what="spool drained")
        got = decode_frames(col.wait_count(6, "/frames"))
        first_seen: List[int] = []
        for f in got:
            if f.sequence not in first_seen:
                first_seen.append(f.sequence)
        assert first_seen == list(range(6))  # duplicates allowed on the wire, never loss or reorder
    finally:
        col.close()


def test_frame_the_broker_refuses_is_set_aside_and_does_not_block_the_rest(broker_factory, tmp_path: Path,
                                                                          publishers, caplog) -> None:  # noqa: ANN001
    """A broker that closes the connection on a packet over its max_packet_size: the frame is sent
    alone a few times, then set aside (kept in dead/), and the frames behind it arrive; no tight
    reconnect loop (the backoff grows across the short-lived connections)."""
    b = broker_factory(max_packet_size=2000)
    dev = "poison1"
    col = Collector(b.host, b.port, [topics.frames(dev)])
    try:
        pub = publishers(make_cfg(b.host, b.port, max_send_attempts=3), dev, tmp_path / "spool")
        with caplog.at_level(logging.INFO, logger="edge"):
            assert pub.publish_frame(frame(0, dev, size=5000))  # stored: only the broker refuses it
            assert pub.publish_frame(frame(1, dev, size=10))
            assert pub.publish_frame(frame(2, dev, size=10))
            pub.start()
            got = decode_frames(col.wait_count(2, "/frames", timeout=30))
            wait_for(lambda: pub.spool_stats()[1] == 0, 10, what="spool drained")
        assert [(f.frame_id, f.sequence) for f in got] == [(f"{dev}-1", 1), (f"{dev}-2", 2)]
        assert pub.dead_letters == 1
        dead = pub.spool.dead_letters()
        assert [p.name for p in dead] == ["00000000000000000000.rec"]
        from edge.uplink.spool import decode_record

        kept = kestrel_pb2.Frame.FromString(decode_record(dead[0].read_bytes()))
        assert kept.frame_id == f"{dev}-0" and len(kept.image) == 5000
        set_aside = [r for r in caplog.records if "set aside" in r.getMessage()]
        assert len(set_aside) == 1 and set_aside[0].levelno == logging.ERROR
        assert "max_packet_size" in set_aside[0].getMessage()
        # three connections carried frame 0 (then it was set aside) and one more carried the rest
        assert pub.mqtt.connections == 4
        delays = list(pub.mqtt.delays)
        assert delays[:3] == [0.05, 0.1, 0.2], delays  # not reset by the short-lived connections
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "edge.uplink.mqtt"]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one line for the whole episode
    finally:
        col.close()
    again = publisher_for(make_cfg(b.host, b.port), dev, tmp_path / "spool")  # the count survives a restart
    assert again.dead_letters == 1 and again.spool.next_sequence == 3


def test_our_own_disconnects_never_set_a_good_frame_aside(broker_factory, tmp_path: Path, publishers) -> None:  # noqa: ANN001
    """Only a link the broker closed can blame the frame in flight: with max_send_attempts=1 a drop on
    a missing PUBACK and our own stop() while frames are in flight leave them in the spool, not in dead/."""
    b = broker_factory()
    dev = "blame1"
    assert b.proc is not None
    pub = publishers(make_cfg(b.host, b.port, ack_timeout_s=0.5, max_send_attempts=1), dev, tmp_path / "spool")
    pub.start()
    wait_for(lambda: pub.connected, 10, what="connected")
    os.kill(b.proc.pid, signal.SIGSTOP)  # the broker hangs: no PUBACK comes, we drop the link
    try:
        pub.publish_frame(frame(0, dev))
        wait_for(lambda: pub.frames_sent >= 1, 10, what="frame 0 in flight")
        wait_for(lambda: not pub.connected, 10, what="link dropped on the missing PUBACK")
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    wait_for(lambda: pub.spool_stats()[1] == 0, 15, what="frame 0 resent and acknowledged")
    assert pub.dead_letters == 0 and pub.spool.dead_letters() == []
    os.kill(b.proc.pid, signal.SIGSTOP)  # frames in flight when we stop
    try:
        sent = pub.frames_sent
        pub.publish_frame(frame(1, dev))
        wait_for(lambda: pub.frames_sent > sent, 10, what="frame 1 in flight")
        pub.stop(flush_timeout_s=0.3)
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    assert pub.dead_letters == 0 and pub.spool.dead_letters() == []
    assert pub.spool_stats()[1] == 1  # kept in the spool for the next start


def test_broker_outage_is_one_warning_line(broker_factory, tmp_path: Path, publishers, caplog) -> None:  # noqa: ANN001
    b = broker_factory()
    dev = "outlog1"
    pub = publishers(make_cfg(b.host, b.port), dev, tmp_path / "spool")
    pub.start()
    wait_for(lambda: pub.connected, 10, what="connected")
    with caplog.at_level(logging.DEBUG, logger="edge.uplink.mqtt"):
        b.stop()
        wait_for(lambda: not pub.connected, 10, what="link lost")
        attempts = pub.mqtt.connect_attempts
        wait_for(lambda: pub.mqtt.connect_attempts >= attempts + 3, 10, what="3 failed reconnect attempts")
        b.start()
        wait_for(lambda: pub.connected, 10, what="reconnected")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "lost" in warnings[0], warnings
    quiet = [r for r in caplog.records if r.levelno == logging.DEBUG and "cannot reach broker" in r.getMessage()]
    assert len(quiet) >= 3  # the later attempts are still visible at DEBUG


def test_spool_write_failure_is_logged_once_and_counted(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    import resource

    dev = "full1"
    pub = publisher_for(make_cfg("", 1883), dev, tmp_path / "spool")  # no broker: frames stay in the spool
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    with caplog.at_level(logging.INFO, logger="edge.uplink.publisher"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # a real write error (EFBIG) past 4 KiB
        try:
            stored = [pub.publish_frame(frame(i, dev, size=8000)) for i in range(3)]
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert stored == [False] * 3 and pub.spool_write_failed == 3 and pub.spool_stats()[1] == 0
        assert pub.publish_frame(frame(3, dev, size=8000))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "cannot write a frame" in errors[0] and "free space" in errors[0]
    assert any("writable again (3 frames could not be stored)" in r.getMessage() for r in caplog.records)
    assert [q for q, _ in pub.spool.after(None, 10)] == [0]


def test_frames_over_tls_and_a_wrong_ca_is_refused(tmp_path: Path, publishers, caplog) -> None:  # noqa: ANN001
    from tests.helpers.tlscerts import make_tls

    tls = make_tls(tmp_path / "tls")
    other = make_tls(tmp_path / "other", ca_name="someone-else")
    b = Mosquitto(tmp_path / "mosq-tls", tls=(tls.ca, tls.cert, tls.key)).start()
    dev = "tls1"
    try:
        col = Collector(b.host, b.port, [topics.frames(dev), topics.status(dev)], ca_file=str(tls.ca))
        try:
            pub = publishers(make_cfg(b.host, b.port, tls=True, ca_file=str(tls.ca)), dev, tmp_path / "s1")
            pub.start()
            for i in range(3):
                assert pub.publish_frame(frame(i, dev))
            got = decode_frames(col.wait_count(3, "/frames"))
            assert [f.frame_id for f in got] == [f"{dev}-{i}" for i in range(3)]
            assert decode_status(col.wait_count(1, "/status")[0]).state == "online"
        finally:
            col.close()
        with caplog.at_level(logging.WARNING, logger="edge.uplink.mqtt"):
            bad = publishers(make_cfg(b.host, b.port, tls=True, ca_file=str(other.ca)), "tls2", tmp_path / "s2")
            bad.start()
            bad.publish_frame(frame(0, "tls2"))
            wait_for(lambda: bad.mqtt.connect_attempts >= 3, 15, what="three refused TLS handshakes")
        assert not bad.connected and bad.spool_stats()[1] == 1  # kept for when the CA is fixed
        assert "certificate verify failed" in str(bad.last_error)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "certificate verify failed" in warnings[0], warnings
    finally:
        b.stop()


# ---- the subprocess publisher ----------------------------------------------------------------------


def child_main(argv: List[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    mqtt_cfg = json.loads(argv[0])
    device, spool = argv[1], Path(argv[2])
    cfg = EdgeConfig()
    for k, v in mqtt_cfg.items():
        setattr(cfg.mqtt, k, v)
    pub = publisher_for(cfg, device, spool)
    pub.set_status_provider(lambda state: kestrel_pb2.Status(device_id=device, state=state, group="g-test"))
    pub.start()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        reply: Optional[str] = None
        if cmd[0] == "frame":
            f = frame(int(cmd[1]), device)
            pub.publish_frame(f)
            reply = f"seq {f.sequence}"
        elif cmd[0] == "spool":
            reply = f"spool {pub.spool_stats()[1]}"
        elif cmd[0] == "connected":
            reply = f"connected {int(pub.connected)}"
        elif cmd[0] == "stop":
            pub.stop(float(cmd[1]))
            print(f"stopped {pub.spool_stats()[1]}", flush=True)
            return 0
        print(reply, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
