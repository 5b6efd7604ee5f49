"""A hub SIGKILLed mid-stream and restarted loses nothing (persistent session, ack after commit)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

from edge import topics
from hub.store.sqlite import SqliteStore
from tests.helpers.wait import wait_for
from tests.hub import HubProcess, frame_payload, publish_all, write_config

N = 300


def test_sigkill_mid_stream_then_restart_loses_nothing(broker: Any, tmp_path: Path) -> None:
    data = tmp_path / "hub"
    group = f"r{uuid.uuid4().hex[:8]}"
    cfg = write_config(tmp_path / "hub.toml", data, broker.host, broker.port, client_id=f"hub-{group}",
                       extra_mqtt=f'share_group = "{group}"')
    hub = HubProcess(cfg, data, tmp_path / "hub.log").start()
    store = SqliteStore(data / "hub.db")
    wait_for(lambda: hub.health()["broker"]["connected"], 15, what="hub connected")  # type: ignore[index]
    items = [(topics.frames(f"cam-{i % 4}"), frame_payload(f"k{i}", f"cam-{i % 4}", seq=i)) for i in range(N)]
    done = threading.Event()

    def publisher() -> None:
        publish_all(broker.host, broker.port, items[:N // 3])
        wait_for(lambda: store.count_frames() >= 20, 20, what="some frames stored before the kill")
        publish_all(broker.host, broker.port, items[N // 3:])  # goes on while the hub is dead
        done.set()

    t = threading.Thread(target=publisher)
    t.start()
    try:
        wait_for(lambda: store.count_frames() >= 20, 20, what="hub storing")
        hub.kill()  # SIGKILL: no clean disconnect, no chance to ack anything extra
        before = store.count_frames()
        assert before < N
        t.join(60)
        assert done.is_set()
        hub.start()  # same client id: the broker resends the unacked and the queued frames
        wait_for(lambda: store.count_frames() == N, 30, what=f"all {N} frames after the restart")
        ids = {f.frame_id for f in store.list_frames(limit=N + 10)}
        assert ids == {f"k{i}" for i in range(N)}
    finally:
        hub.stop()
        store.close()
