"""``kestrel-hub serve``: one process runs the MQTT ingest, the gRPC registry + fleet and the HTTP server.

Start order: the data folder's lock (hub.datadir: one hub per data folder; a second exits 2 naming the
holder's PID and changes nothing) -> store -> broker (embedded Mosquitto or the configured one) ->
ingest -> registry, fleet and gRPC -> HTTP. The bound ports go to ``<data_dir>/hub.json`` (atomic
write) and the log, so port 0 ("any free port") is usable by scripts and tests; ports the hub chose
are kept in ``<data_dir>/ports.json`` and bound again at the next start when free. SIGTERM/SIGINT stop it cleanly;
a SIGKILL loses nothing because nothing is acknowledged before it is stored.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from hub import config as hubconfig
from hub.broker import BrokerTarget, EmbeddedBroker, packet_limit, resolve
from hub.config import HubConfig
from hub.datadir import DataDirLock, KeptPorts
from hub.errors import ConfigError, KestrelError, TransportError
from hub.http import HttpServer
from hub.ingest.service import Ingest
from hub.store.base import Store
from hub.store.open import open_store
from proto import atomic

log = logging.getLogger("hub.server")

PUBLISH_TIMEOUT_S = 10.0
SESSION_FILE = "mqtt-session.json"  # in data_dir: the broker holds a session for our client id
SIGNAL_POLL_S = 0.5  # the main thread's wake-up while serving
# The ingest's threads hand the GIL over thousands of times a second (every socket read, SQLite step,
# write and fsync releases it); a thread coming back from one waits up to this long for a busy one to
# let go. Python's 5 ms made the commit and write-ahead threads queue behind the network thread.
GIL_SWITCH_INTERVAL_S = 0.001


class HubServer:
    def __init__(self, cfg: HubConfig) -> None:
        self.cfg = cfg
        self.store: Optional[Store] = None
        self.embedded: Optional[EmbeddedBroker] = None
        self.target: Optional[BrokerTarget] = None
        self.ingest: Optional[Ingest] = None
        self.http: Optional[HttpServer] = None
        self.grpc_server: Any = None
        self.grpc_port = 0
        self.registry: Any = None
        self.fleet: Any = None
        self.lock: Optional[DataDirLock] = None

    # ---- start/stop ----
    def start(self) -> HubServer:
        cfg = self.cfg
        try:
            cfg.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"[hub] data_dir {cfg.data_dir}: cannot create it: {exc.strerror}") from exc
        self.lock = DataDirLock(cfg.data_dir).acquire()  # before anything in data_dir is started or written
        client_id = cfg.resolve_client_id()
        self.store = open_store(cfg)
        if cfg.mqtt.embedded:
            self.embedded = EmbeddedBroker(cfg.data_dir / "broker", port=cfg.mqtt.embedded_port,
                                           autosave_s=cfg.mqtt.embedded_autosave_s,
                                           max_packet_size=packet_limit(cfg.mqtt.max_payload_bytes)).start()
            self.target = BrokerTarget(host=self.embedded.host, port=self.embedded.port, embedded=True)
        else:
            self.target = resolve(cfg)
        dead_letter = cfg.dead_letter_dir
        self.ingest = Ingest(self.store, self.target, cfg.mqtt, client_id, dead_letter_dir=dead_letter,
                             session_file=cfg.data_dir / SESSION_FILE).start()
        ports = KeptPorts(cfg.data_dir)
        self._start_grpc(ports.choose("grpc", cfg.grpc.port, cfg.grpc.bind))
        ports.keep("grpc", cfg.grpc.port, self.grpc_port)
        self.http = HttpServer(cfg.http.bind, ports.choose("http", cfg.http.port, cfg.http.bind), self.health).start()
        ports.keep("http", cfg.http.port, self.http.port)
        info = {"pid": os.getpid(), "http_port": self.http.port, "grpc_port": self.grpc_port,
                "mqtt_host": self.target.host, "mqtt_port": self.target.port,
                "mqtt_embedded": self.target.embedded, "client_id": client_id, "store": cfg.store_url}
        atomic.write_text(cfg.data_dir / "hub.json", json.dumps(info, indent=1) + "\n")
        log.info("kestrel-hub serving: http %s:%d, grpc %s:%d, mqtt %s:%d%s, store %s", cfg.http.bind,
                 self.http.port, cfg.grpc.bind, self.grpc_port, self.target.host, self.target.port,
                 " (embedded)" if self.target.embedded else "", self.store)
        return self

    def _start_grpc(self, port: int) -> None:
        """Registry + fleet from hub.registry / hub.fleet / hub.grpc_service (helper F2's modules)."""
        from hub.fleet import FleetService
        from hub.grpc_service import make_server
        from hub.registry import Registry

        assert self.store is not None
        cfg = self.cfg
        self.registry = Registry(self.store, cfg.registry, cfg.data_dir)
        self.fleet = FleetService(self.store, self.registry, self.publish_retained,
                                  grpc_target=cfg.grpc.advertise)
        server, bound = make_server(self.registry, self.fleet, cfg.grpc.bind, port, cfg.grpc.max_workers)
        server.start()
        self.grpc_server, self.grpc_port = server, bound

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """QoS 1 retained publish through the ingest's connection; returns once the broker acknowledged."""
        if self.ingest is None:
            raise TransportError("the hub is not connected to a broker")
        info = self.ingest.client.publish(topic, payload, qos=1, retain=True)
        try:
            info.wait_for_publish(PUBLISH_TIMEOUT_S)
        except (RuntimeError, ValueError) as exc:
            raise TransportError(f"cannot publish to {topic}: {exc}") from exc
        if not info.is_published():
            raise TransportError(f"the broker did not acknowledge {topic} within {PUBLISH_TIMEOUT_S}s")

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
        if self.grpc_server is not None:
            self.grpc_server.stop(grace=2).wait(5)
        if self.ingest is not None:
            self.ingest.stop()
        if self.embedded is not None:
            self.embedded.stop()
        if self.store is not None:
            self.store.close()
        if self.lock is not None:
            self.lock.release()

    # ---- health ----
    def health(self) -> Dict[str, Any]:
        store: Dict[str, Any] = {"backend": type(self.store).__name__, "ok": False}
        try:
            if self.store is None:
                raise TransportError("no store")
            self.store.ping()
            store["ok"] = True
            store.update(self.store.health())
        except KestrelError as exc:
            store["error"] = str(exc)
        ingest = self.ingest.health() if self.ingest else {}
        broker: Dict[str, Any] = {"connected": bool(ingest.get("connected")),
                                  "sessions_lost": int(ingest.get("sessions_lost", 0))}
        if self.target is not None:
            broker.update(host=self.target.host, port=self.target.port, embedded=self.target.embedded)
        if self.embedded is not None:
            broker.update(running=self.embedded.running, restarts=self.embedded.restarts)
        ok = store["ok"] and broker["connected"] and not ingest.get("paused") \
            and bool(ingest.get("threads_alive"))
        return {"ok": ok, "store": store, "broker": broker, "ingest": ingest,
                "grpc": {"port": self.grpc_port, "running": self.grpc_server is not None}}


# ---- the subcommand ----
def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="hub.toml (default: embedded defaults)")
    p.add_argument("--check-config", action="store_true", help="load and validate the config, then exit")
    p.add_argument("--print-config-doc", action="store_true", help="print every config key with its doc")


def _check(cfg: HubConfig) -> List[Tuple[str, str]]:
    """Checks that need no server: store URL form, password file, mosquitto binary."""
    import shutil

    from hub.errors import ConfigError
    url = cfg.store_url
    if "://" in url and not url.startswith(("sqlite://", "mongodb://", "mongodb+srv://")):
        raise ConfigError(f"[store] url {url!r}: use sqlite:///path, a file path or mongodb://host/db")
    if cfg.mqtt.embedded and not shutil.which("mosquitto") and not Path("/usr/sbin/mosquitto").exists():
        raise ConfigError("[mqtt] host is empty (embedded broker) but mosquitto is not installed")
    if not cfg.mqtt.embedded:
        resolve(cfg)  # reads the password file
    return [("store", url), ("mqtt", "embedded" if cfg.mqtt.embedded else f"{cfg.mqtt.host}:{cfg.mqtt.port}")]


def run_serve(args: argparse.Namespace) -> int:
    if args.print_config_doc:
        print("\n".join(hubconfig.describe_config()))
        return 0
    cfg = hubconfig.load(args.config)
    logging.getLogger().setLevel(cfg.hub.log_level.upper())
    checked = _check(cfg)
    if args.check_config:
        print(f"config OK ({args.config or 'defaults'}): " + ", ".join(f"{k} {v}" for k, v in checked))
        return 0
    stopping: List[int] = []  # a plain flag: the handler must not take a lock (see below)

    def on_signal(signum: int, frame: Any) -> None:
        stopping.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # this process is the hub alone (see the constant)
    server = HubServer(cfg)
    try:
        server.start()
        # A handler runs in the main thread between two bytecodes, possibly while that thread holds an
        # Event's lock inside Event.wait: Event.set() there would deadlock (seen after SIGSTOP/SIGCONT).
        # So the handler appends to a list and the main thread looks every SIGNAL_POLL_S.
        while not stopping:
            time.sleep(SIGNAL_POLL_S)
        log.info("stopping")
    finally:
        server.stop()
    return 0
