"""A hub SIGKILLed mid-stream and restarted loses nothing (persistent session, ack after commit)."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path
from typing import Any

from hub.store.sqlite import SqliteStore
from proto import topics
from tests.helpers.wait import wait_for
from tests.hub import HubProcess, frame_payload, publish_all, write_config

N = 300
FIRST = 100


def unread_bytes_from(pid: int, remote_port: int) -> int:
    """Bytes the kernel received on the process's TCP sockets to ``remote_port`` that it has not read
    yet (Linux /proc): frames the broker delivered and the process can never have acknowledged."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[9] in inodes and int(parts[2].rsplit(":", 1)[1], 16) == remote_port:
                total += int(parts[4].split(":")[1], 16)
    return total


def test_sigkill_with_frames_in_flight_then_restart_loses_nothing(broker: Any, tmp_path: Path) -> None:
    """The hub is frozen (SIGSTOP) while devices go on publishing, so the broker has delivered frames
    into its socket that it can never acknowledge; then it is SIGKILLed. The restarted hub (same
    client id) gets the unacknowledged and the queued frames: every frame stored exactly once."""
    data = tmp_path / "hub"
    group = f"r{uuid.uuid4().hex[:8]}"
    cfg = write_config(tmp_path / "hub.toml", data, broker.host, broker.port, client_id=f"hub-{group}",
                       extra_mqtt=f'share_group = "{group}"')
    hub = HubProcess(cfg, data, tmp_path / "hub.log").start()
    store = SqliteStore(data / "hub.db")
    items = [(topics.frames(f"cam-{i % 4}"), frame_payload(f"k{i}", f"cam-{i % 4}", seq=i)) for i in range(N)]
    try:
        wait_for(lambda: hub.health()["broker"]["connected"], 15, what="hub connected")  # type: ignore[index]
        publish_all(broker.host, broker.port, items[:FIRST])
        wait_for(lambda: store.count_frames() >= 20, 20, what="hub storing")
        assert hub.proc is not None
        hub.proc.send_signal(signal.SIGSTOP)
        publish_all(broker.host, broker.port, items[FIRST:])  # the broker takes them while the hub is frozen
        wait_for(lambda: unread_bytes_from(hub.proc.pid, broker.port) > 0, 10,  # type: ignore[union-attr]
                 what="frames delivered into the frozen hub's socket")
        at_kill = store.count_frames()
        assert 20 <= at_kill <= FIRST  # nothing sent after the freeze can have been stored
        hub.kill()  # SIGKILL: no clean disconnect, no chance to ack anything
        hub.start()  # same client id: the broker resends the unacked and the queued frames
        wait_for(lambda: store.count_frames() == N, 30, what=f"all {N} frames after the restart")
        ids = {f.frame_id for f in store.list_frames(limit=N + 10)}
        assert ids == {f"k{i}" for i in range(N)}
        h = wait_for(lambda: (lambda h: h if h["ingest"]["stored"] == N - at_kill else None)(hub.health()), 10,
                     what="the restarted hub's count")
        assert sum(h["ingest"]["rejected"].values()) == 0  # type: ignore[index]
    finally:
        hub.stop()
        store.close()
