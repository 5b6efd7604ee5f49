"""The read-ahead socket under paho: one recv serves many small reads, pending() tells paho's loop."""

from __future__ import annotations

import socket

import pytest

from hub.ingest.mqttsock import ReadAheadSocket


def test_small_reads_are_served_from_one_recv_and_pending_counts_them() -> None:
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        calls = []

        class Counting:
            def recv(self, n: int) -> bytes:
                calls.append(n)
                return b.recv(n)

            def fileno(self) -> int:
                return b.fileno()
        s = ReadAheadSocket(Counting(), size=1024)
        a.sendall(b"\x30\x83\x01" + b"x" * 131 + b"\x40\x02\x00\x01")
        assert s.recv(1) == b"\x30" and s.pending() == 137
        assert s.recv(1) + s.recv(1) == b"\x83\x01"
        assert s.recv(200) == b"x" * 131 + b"\x40\x02\x00\x01"  # at most what is buffered
        assert s.pending() == 0 and calls == [1024]
        assert s.fileno() == b.fileno()  # everything else goes to the socket
        with pytest.raises(BlockingIOError):  # nothing buffered, nothing in the kernel: as paho expects
            s.recv(1)
        a.sendall(b"y" * 5000)
        assert s.recv(4000) == b"y" * 4000 and s.recv(4000) == b"y" * 1000  # large reads straight through
        a.close()
        assert s.recv(1) == b""  # closed
    finally:
        b.close()


def test_the_ingest_reads_ahead_over_tls_and_stores_every_frame(tmp_path) -> None:  # noqa: ANN001
    """The read-ahead wrapper sits over the TLS socket when the broker is TLS: paho's reads of 50 KB
    frames that span TLS records, and its pending() check, must still deliver every frame, once."""
    import uuid

    from hub.broker import BrokerTarget
    from hub.config import MqttSection
    from hub.ingest.pipeline import Ingest
    from hub.store.sqlite import SqliteStore
    from proto import topics
    from tests.helpers.broker import Mosquitto
    from tests.helpers.tlscerts import make_tls
    from tests.helpers.wait import wait_for
    from tests.hub import frame_payload, jpeg, publish_all

    store = SqliteStore(tmp_path / "hub.db")
    tls = make_tls(tmp_path / "tls")
    b = Mosquitto(tmp_path / "mosq-tls", tls=(tls.ca, tls.cert, tls.key)).start()
    ing = Ingest(store, BrokerTarget(b.host, b.port, tls=True, ca_file=str(tls.ca)),
                 MqttSection(share_group=f"g{uuid.uuid4().hex[:8]}", retry_initial_s=0.05, retry_max_s=0.3),
                 f"hub-{uuid.uuid4().hex[:8]}", dead_letter_dir=tmp_path / "dead")
    try:
        ing.start()
        assert ing.wait_subscribed(10), "ingest did not subscribe over TLS"
        assert isinstance(ing.client._sock, ReadAheadSocket)  # the wrapper really is over the TLS socket
        images = [jpeg(i, w=280, h=210) for i in range(3)]  # ~50 KB each: many TLS records per frame
        items = [(topics.frames("cam-t"), frame_payload(f"cam-t-{i}", "cam-t", seq=i,
                                                        image=images[i % 3]))
                 for i in range(60)]
        publish_all(b.host, b.port, items, ca_file=str(tls.ca))
        wait_for(lambda: store.count_frames() == 60, 30, what="60 frames stored over TLS")
        got = store.get_frame("cam-t-31")
        assert got is not None and got.image == images[1]
        h = ing.health()
        assert h["stored"] == 60 and h["duplicates"] == 0 and sum(h["rejected"].values()) == 0, h
    finally:
        ing.stop()
        b.stop()
        store.close()
