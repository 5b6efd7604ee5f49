"""The two places where the ingest reaches into paho-mqtt's private API, and what happens without them.

Why this is acceptable, how it is pinned (paho-mqtt >=2,<3) and what replaces it: docs/adr/0011-paho-private-hooks.md.
tests/hub/test_pahohooks.py fails when a paho release stops taking either hook (the fallbacks work, slower).

1. A read-ahead socket (``Client._create_socket``). paho reads each packet with a recv of 1 byte (its
   type), one per byte of its remaining length, then the rest; every recv is a syscall that releases
   and retakes the GIL. At thousands of 50 KB frames a second that is most of the network thread's
   time, and the GIL hand-overs slow the ingest's other threads too. ``ReadAheadSocket.recv`` takes
   whatever the kernel has (up to READ_AHEAD_BYTES) and serves paho's small reads from it;
   ``pending()`` tells paho's loop that bytes are waiting (it already asks SSL sockets the same), so it
   does not wait in select() while they are buffered. Everything else goes to the socket.
   Fallback: paho's own socket (about five recv per packet).
2. A batch's PUBACKs in one write (``Client._packet_queue``). paho sends each ack as its own packet,
   with a wake-up write to its network thread per ack (two syscalls and a GIL hand-over each, per
   frame); ``queue_pubacks`` puts the PUBACK packets of a batch back to back in one buffer, queued like
   paho's own (paho keeps no state for received QoS 1 messages, so nothing is bypassed).
   Fallback: ``Client.ack`` per message.
"""

from __future__ import annotations

import inspect
import logging
import struct
from typing import Any, Callable, List, Optional

import paho.mqtt
import paho.mqtt.client as mqtt

log = logging.getLogger("hub.ingest.pahohooks")

READ_AHEAD_BYTES = 256 * 1024
PUBACK_FORMAT = struct.Struct("!BBH")  # MQTT 3.1.1 PUBACK: type, remaining length 2, packet id
ADR = "docs/adr/0011-paho-private-hooks.md"
PAHO_VERSION = getattr(paho.mqtt, "__version__", "?")


class ReadAheadSocket:
    def __init__(self, sock: Any, size: int = READ_AHEAD_BYTES) -> None:
        self._sock = sock
        self._size = size
        self._buf = b""
        self._pos = 0
        self.recv_calls = 0  # recv calls that reached the socket (tests: paho really reads through us)

    def recv(self, n: int) -> bytes:
        if self._pos >= len(self._buf):
            self.recv_calls += 1
            data = self._sock.recv(max(n, self._size))  # BlockingIOError etc. reach paho as before
            if len(data) <= n:  # b"" (closed) included
                return bytes(data)
            self._buf, self._pos = bytes(data), 0
        out = self._buf[self._pos:self._pos + n]
        self._pos += len(out)
        if self._pos >= len(self._buf):
            self._buf, self._pos = b"", 0
        return out

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return len(self._buf) - self._pos + (int(inner()) if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def read_ahead_supported() -> bool:
    """Whether this paho has the socket factory that Client overrides."""
    return callable(getattr(mqtt.Client, "_create_socket", None))


class Client(mqtt.Client):
    """paho's Client with a read-ahead socket; ``sockets_wrapped`` counts the sockets it wrapped."""

    sockets_wrapped = 0

    def _create_socket(self) -> Any:
        sock = super()._create_socket()
        self.sockets_wrapped += 1
        return ReadAheadSocket(sock)


def make_client(*args: Any, **kwargs: Any) -> mqtt.Client:
    """A Client with the read-ahead socket, or paho's own (logged) when this paho has no such hook."""
    if read_ahead_supported():
        return Client(*args, **kwargs)
    log.warning("paho-mqtt %s has no Client._create_socket: the ingest reads without read-ahead (slower; "
                "see %s)", PAHO_VERSION, ADR)
    return mqtt.Client(*args, **kwargs)


def puback_queue(client: mqtt.Client) -> Optional[Callable[..., Any]]:
    """paho's packet queue when it takes (command, packet, mid, qos) as the batched PUBACK write needs,
    else None (logged): then every ack goes through ``Client.ack``."""
    queue = getattr(client, "_packet_queue", None)
    try:
        if queue is None or not callable(queue):
            raise TypeError("no Client._packet_queue")
        inspect.signature(queue).bind(mqtt.PUBACK, b"", 0, 0)
    except (TypeError, ValueError) as exc:
        log.warning("paho-mqtt %s: %s: every PUBACK is written on its own (slower; see %s)",
                    PAHO_VERSION, exc, ADR)
        return None
    return queue


def queue_pubacks(queue: Callable[..., Any], mids: List[int]) -> None:
    """Queue the PUBACKs of ``mids`` as one packet buffer on paho's out queue (written at once by its
    network thread)."""
    queue(mqtt.PUBACK, b"".join(PUBACK_FORMAT.pack(mqtt.PUBACK, 2, mid) for mid in mids), 0, 0)
