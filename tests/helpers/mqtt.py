"""A small paho subscriber that collects messages, for assertions."""

from __future__ import annotations

import threading
from typing import List, Tuple

import paho.mqtt.client as mqtt

from tests.helpers.wait import wait_for


class Collector:
    def __init__(self, host: str, port: int, topics: List[str], qos: int = 1, client_id: str = "",
                 ca_file: str = "", cert_file: str = "", key_file: str = "") -> None:
        """Over TLS when ``ca_file`` is given, with a client certificate when ``cert_file`` is (e.g. the
        hub's own identity on a hub's embedded broker: tests.hub.hub_identity)."""
        self.messages: List[Tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.topics = topics
        self.qos = qos
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=not client_id)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a, **k: self._subscribed.set()
        if ca_file:
            self.client.tls_set(ca_certs=ca_file, certfile=cert_file or None, keyfile=key_file or None)
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("collector did not subscribe")

    def _on_connect(self, client, userdata, flags, rc, props=None):  # noqa: ANN001
        client.subscribe([(t, self.qos) for t in self.topics])

    def _on_message(self, client, userdata, msg):  # noqa: ANN001
        with self._lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def payloads(self, topic_suffix: str = "") -> List[bytes]:
        with self._lock:
            return [p for t, p, _ in self.messages if t.endswith(topic_suffix)]

    def wait_count(self, n: int, topic_suffix: str = "", timeout: float = 15.0) -> List[bytes]:
        wait_for(lambda: len(self.payloads(topic_suffix)) >= n, timeout,
                 what=f"{n} messages on *{topic_suffix}")
        return self.payloads(topic_suffix)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
