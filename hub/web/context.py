"""What the web routes need from the running hub, in one object (``request.app.state.ctx``)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Optional

from hub.config import HttpSection
from hub.metrics import HubMetrics
from hub.store.base import Store


@dataclasses.dataclass
class WebContext:
    store: Store
    http: HttpSection                                  # [http]: auth_reads, sessions, paging, thumbnails
    health: Callable[[], Dict[str, Any]]               # the /healthz snapshot (HubServer.health)
    metrics: HubMetrics
    fleet: Any = None                                  # hub.fleet.FleetService (None: deploys are refused)
    registry: Any = None                               # hub.registry.Registry
    clock: Callable[[], float] = time.time
    thumbs: Any = None                                 # hub.web.images.ThumbCache (made by create_app)
    version: str = ""

    def now_ms(self) -> int:
        return int(self.clock() * 1000)


def ctx_of(request: Any) -> WebContext:
    ctx: Optional[WebContext] = getattr(request.app.state, "ctx", None)
    if ctx is None:  # pragma: no cover - create_app always sets it
        raise RuntimeError("the web app has no context")
    return ctx
