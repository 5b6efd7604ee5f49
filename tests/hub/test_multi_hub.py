"""Two hub processes in one share group split the frames; every frame is stored exactly once."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from hub.store.sqlite import SqliteStore
from proto import topics
from tests.helpers.wait import wait_for
from tests.hub import HubProcess, frame_payload, publish_all, write_config

N = 200


def test_two_hubs_share_the_subscription(broker: Any, tmp_path: Path) -> None:
    group = f"m{uuid.uuid4().hex[:8]}"
    db = tmp_path / "shared.db"
    hubs = []
    for name in ("a", "b"):
        data = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.toml", data, broker.host, broker.port,
                           client_id=f"hub-{group}-{name}", store_url=f"sqlite:///{db}",
                           extra_mqtt=f'share_group = "{group}"')
        hubs.append(HubProcess(cfg, data, tmp_path / f"{name}.log"))
    try:
        for h in hubs:
            h.start()
        for h in hubs:
            wait_for(lambda h=h: h.health()["broker"]["connected"], 15, what="hub connected")  # type: ignore
        publish_all(broker.host, broker.port,
                    [(topics.frames(f"cam-{i % 5}"), frame_payload(f"s{i}", f"cam-{i % 5}", seq=i))
                     for i in range(N)])
        store = SqliteStore(db)
        wait_for(lambda: store.count_frames() == N, 30, what=f"{N} frames stored")
        stats = [wait_for(lambda h=h: (lambda s: s if s["acked"] == s["received"] else None)(
            h.health()["ingest"]), 10, what="acks caught up") for h in hubs]  # type: ignore[index]
        stored = [s["stored"] for s in stats]
        assert sum(stored) == N                       # each frame delivered to exactly one hub...
        assert all(s["duplicates"] == 0 for s in stats)  # ...and never to both
        assert all(n > 0 for n in stored), f"both hubs should have taken a share: {stored}"
        assert {f.frame_id for f in store.list_frames(limit=N + 1)} == {f"s{i}" for i in range(N)}
        store.close()
    finally:
        for h in hubs:
            h.stop()
