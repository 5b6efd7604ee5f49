"""A paho client whose socket reads ahead: one recv per burst of packets instead of about five per packet.

paho reads each packet with a recv of 1 byte (its type), one per byte of its remaining length, then the
rest; every recv is a syscall that releases and retakes the GIL. At thousands of 50 KB frames a second
that is most of the network thread's time, and the GIL hand-overs slow the ingest's other threads too.
``ReadAheadSocket.recv`` takes whatever the kernel has (up to READ_AHEAD_BYTES) and serves paho's small
reads from it; ``pending()`` tells paho's loop that bytes are waiting (it already asks SSL sockets the
same), so it does not wait in select() while they are buffered. Everything else goes to the socket.
"""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as mqtt

READ_AHEAD_BYTES = 256 * 1024


class ReadAheadSocket:
    def __init__(self, sock: Any, size: int = READ_AHEAD_BYTES) -> None:
        self._sock = sock
        self._size = size
        self._buf = b""
        self._pos = 0

    def recv(self, n: int) -> bytes:
        if self._pos >= len(self._buf):
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


class Client(mqtt.Client):
    """paho's Client with a read-ahead socket (falls back to paho's own when its internals differ)."""

    def _create_socket(self) -> Any:
        sock = super()._create_socket()
        return ReadAheadSocket(sock)


def make_client(*args: Any, **kwargs: Any) -> mqtt.Client:
    if callable(getattr(mqtt.Client, "_create_socket", None)):
        return Client(*args, **kwargs)
    return mqtt.Client(*args, **kwargs)  # pragma: no cover - a paho without the hook: plain reads
