"""The read-ahead socket under paho: one recv serves many small reads, pending() tells paho's loop."""

from __future__ import annotations

import socket

import pytest

from hub.mqttsock import ReadAheadSocket


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
