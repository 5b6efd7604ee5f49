"""The seam between the daemon and the updater. INTERFACE STUB: the updater work replaces the
bodies; the daemon (edge/daemon.py) calls exactly these methods.

Lifecycle inside ``kestrel-edge run``::

    svc = UpdateService(cfg, publisher, holder, stats)
    model = svc.boot_model()      # the model to start on (active slot; boot-count rollback), or None
    svc.start()                   # follow desired state (MQTT), start background work
    ... for every inference: svc.observe(result)   # trial health watch
    svc.version_manifest()        # -> proto VersionManifest for status messages
    svc.stop()
"""

from __future__ import annotations

from typing import Any, Optional


class UpdateService:
    def __init__(self, cfg: Any, publisher: Any, holder: Any, stats: Any) -> None:
        self.cfg = cfg
        self.publisher = publisher
        self.holder = holder
        self.stats = stats

    def boot_model(self) -> Optional[Any]:
        """Load the model of the active slot (or roll back first if the trial crashed too often)."""
        return None

    def start(self) -> None:
        """Subscribe to the desired-state topics and start background work."""

    def observe(self, result: Any) -> None:
        """Called by the inference loop after every frame (edge.pipeline.InferenceResult)."""

    def version_manifest(self) -> Any:
        from proto import kestrel_pb2

        return kestrel_pb2.VersionManifest(update_state="IDLE")

    def stop(self) -> None:
        """Stop background work; never leaves a half-switched slot."""
