"""``kestrel-hub serve``: one process runs the MQTT ingest, the gRPC registry + fleet and the HTTP server.

Start order: the data folder's lock (hub.datadir: one hub per data folder; a second exits 2 naming the
holder's PID and changes nothing) -> store -> the fleet's security material (hub/security/: CA, fleet
key, broker files) -> broker (embedded Mosquitto, TLS with the per-device ACL by default, or the
configured one) -> ingest -> registry, fleet (deploys and rollbacks signed by the fleet key) and gRPC
(TLS with a certificate of the fleet CA, a token of the right role on every call: hub/grpc_auth.py)
-> the renewer of signed retained desired state and of the CRL -> HTTP (the dashboard, its API,
/healthz, /metrics: hub/web/). The bound ports go to ``<data_dir>/hub.json`` (atomic write) and the
log, so port 0 ("any free port") is usable by scripts and tests; ports the hub chose are kept in
``<data_dir>/ports.json`` and bound again at the next start when free. A store without any API token
gets an admin token in ``<data_dir>/admin-token`` (0600; the log says where, never the token).
SIGTERM/SIGINT stop it cleanly; a SIGKILL loses nothing because nothing is acknowledged before it is
stored.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from hub import config as hubconfig
from hub.broker import BrokerTarget, EmbeddedBroker, packet_limit, resolve
from hub.config import HubConfig
from hub.datadir import DataDirLock, KeptPorts
from hub.errors import ConfigError, KestrelError, TransportError
from hub.ingest.service import Ingest
from hub.metrics import HubMetrics
from hub.security.enrol import Security
from hub.security.refresh import Renewer
from hub.store.base import Store
from hub.store.open import open_store
from proto import atomic
from proto.clock import now_ms

log = logging.getLogger("hub.server")

PUBLISH_TIMEOUT_S = 10.0
SESSION_FILE = "mqtt-session.json"  # in data_dir: the broker holds a session for our client id
SIGNAL_POLL_S = 0.5  # the main thread's wake-up while serving
# The ingest's threads hand the GIL over thousands of times a second (every socket read, SQLite step,
# write and fsync releases it); a thread coming back from one waits up to this long for a busy one to
# let go. Python's 5 ms made the commit and write-ahead threads queue behind the network thread.
GIL_SWITCH_INTERVAL_S = 0.001
HOUSEKEEPING_S = 300.0  # how often old telemetry points and expired sessions are deleted


class HubServer:
    def __init__(self, cfg: HubConfig) -> None:
        self.cfg = cfg
        self.store: Optional[Store] = None
        self.embedded: Optional[EmbeddedBroker] = None
        self.target: Optional[BrokerTarget] = None
        self.ingest: Optional[Ingest] = None
        self.http: Any = None  # hub.web.server.WebServer
        self.metrics = HubMetrics(self.health, lambda: self.store)
        self.admin_token_file: Optional[Path] = None
        self._housekeeping_stop = threading.Event()
        self._housekeeping: Optional[threading.Thread] = None
        self.grpc_server: Any = None
        self.grpc_port = 0
        self.grpc_plain_port = 0
        self.grpc_auth: Any = None  # hub.grpc_auth.GrpcAuth
        self.registry: Any = None
        self.fleet: Any = None
        self.lock: Optional[DataDirLock] = None
        self.security: Any = None
        self.renewer: Optional[Renewer] = None

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
        self.security = Security(cfg)  # the fleet key signs desired state whatever the broker
        target = self._start_embedded_broker() if cfg.mqtt.embedded else resolve(cfg)
        self.target = target
        dead_letter = cfg.dead_letter_dir
        self.ingest = Ingest(self.store, target, cfg.mqtt, client_id, dead_letter_dir=dead_letter,
                             session_file=cfg.data_dir / SESSION_FILE, on_commit=self.metrics.batch_committed).start()
        ports = KeptPorts(cfg.data_dir)
        self._start_grpc(ports.choose("grpc", cfg.grpc.port, cfg.grpc.bind))
        ports.keep("grpc", cfg.grpc.port, self.grpc_port)
        self.renewer = Renewer(target, f"{client_id}-renew", self.security.signer,
                               cfg.security.refresh_interval_s, renew_crl=self._renew_crl,
                               crl_due=self.security.crl_due).start()
        self._start_http(ports.choose("http", cfg.http.port, cfg.http.bind))
        ports.keep("http", cfg.http.port, self.http.port)
        info = {"pid": os.getpid(), "http_port": self.http.port, "grpc_port": self.grpc_port,
                "grpc_tls": True, "grpc_ca_file": str(self.security.ca_file),
                "grpc_plain_port": self.grpc_plain_port,
                "mqtt_host": target.host, "mqtt_port": target.port,
                "mqtt_embedded": target.embedded, "mqtt_tls": target.tls,
                "mqtt_ca_file": target.ca_file, "client_id": client_id, "store": cfg.store_url,
                "dashboard": f"http://{cfg.http.bind}:{self.http.port}/"}
        if self.admin_token_file is not None:
            info["admin_token_file"] = str(self.admin_token_file)
        atomic.write_text(cfg.data_dir / "hub.json", json.dumps(info, indent=1) + "\n")
        log.info("kestrel-hub serving: dashboard http://%s:%d/, grpc %s:%d TLS%s, mqtt %s:%d%s%s, store %s",
                 cfg.http.bind, self.http.port, cfg.grpc.bind, self.grpc_port,
                 f" (+ plain text on 127.0.0.1:{self.grpc_plain_port})" if self.grpc_plain_port else "",
                 target.host, target.port,
                 " (embedded)" if target.embedded else "", " TLS" if target.tls else "", self.store)
        return self

    def _start_embedded_broker(self) -> BrokerTarget:
        """The embedded Mosquitto: with [security] tls (the default) a TLS listener for the fleet's
        identities and the per-device ACL, the hub connecting with its own certificate; else the plain,
        anonymous loopback broker of a quick local try."""
        cfg = self.cfg
        workdir = cfg.data_dir / "broker"
        limit = packet_limit(cfg.mqtt.max_payload_bytes)  # bounded before memory, on every listener
        if not cfg.security.tls:
            log.warning("[security] tls = false: the embedded broker is plain and anonymous on 127.0.0.1 "
                        "(any local process may publish as any device); for a quick local try only")
            self.embedded = EmbeddedBroker(workdir, port=cfg.mqtt.embedded_port,
                                           autosave_s=cfg.mqtt.embedded_autosave_s, max_packet_size=limit).start()
            return BrokerTarget(host=self.embedded.host, port=self.embedded.port, embedded=True)
        assert self.store is not None
        sec = self.security
        sec.write_broker_files(self.store)
        ident = sec.hub_identity()
        bind = cfg.security.embedded_bind
        self.embedded = EmbeddedBroker(workdir, port=cfg.mqtt.embedded_port, autosave_s=cfg.mqtt.embedded_autosave_s,
                                       listener=lambda port: sec.conf_lines(port, bind), max_packet_size=limit).start()
        password_login = cfg.security.mqtt_auth != "certificate"
        return BrokerTarget(host=self.embedded.host, port=self.embedded.port, embedded=True, tls=True,
                            ca_file=ident.ca_file, cert_file=ident.cert_file, key_file=ident.key_file,
                            username=ident.username if password_login else "",
                            password=ident.password if password_login else "")

    def _renew_crl(self) -> None:
        """A new CRL before the old one runs out (the renewer calls it); the embedded broker reloads."""
        path = self.security.ca.write_crl(self.cfg.security.crl_days, self.security.path("crl.pem"))
        if self.embedded is not None:
            self.embedded.reload()
        else:
            log.warning("wrote a new CRL to %s: install it on the broker and reload it before the old one "
                        "expires", path)

    def _start_grpc(self, port: int) -> None:
        """Registry + fleet (hub.registry, hub.fleet) on gRPC (hub.grpc_service) on ``port`` (kept across
        restarts): TLS with the hub's gRPC certificate of the fleet CA, every call's token checked
        (hub.grpc_auth), a plain-text port on 127.0.0.1 only with [grpc] plain_port."""
        from hub.auth import authenticate
        from hub.fleet import FleetService
        from hub.grpc_auth import GrpcAuth
        from hub.grpc_service import make_server
        from hub.registry import Registry

        store = self.store
        assert store is not None
        cfg = self.cfg
        self.registry = Registry(store, cfg.registry, cfg.data_dir)
        self.fleet = FleetService(store, self.registry, self.publish_retained,
                                  grpc_target=cfg.grpc.advertise, signer=self.security.signer)
        self.grpc_auth = GrpcAuth(lambda token: authenticate(store, token))
        server, bound, plain = make_server(self.registry, self.fleet, cfg.grpc.bind, port,
                                           cfg.grpc.max_workers, auth=self.grpc_auth, tls=self.security.grpc_tls(),
                                           plain_port=cfg.grpc.plain_port or None)
        server.start()
        self.grpc_server, self.grpc_port, self.grpc_plain_port = server, bound, plain

    def _start_http(self, port: int) -> None:
        from hub import __version__
        from hub.auth import ensure_admin_token
        from hub.web.app import create_app
        from hub.web.context import WebContext
        from hub.web.server import WebServer

        assert self.store is not None
        cfg = self.cfg
        made = ensure_admin_token(self.store, cfg.data_dir)
        if made is not None:
            self.admin_token_file = made
            log.info("no API token in the store yet: made an admin token, in %s (0600); log in to the dashboard "
                     "with it and make others with `kestrel-hub tokens add NAME --role ROLE`", made)
        ctx = WebContext(store=self.store, http=cfg.http, health=self.health, metrics=self.metrics,
                         fleet=self.fleet, registry=self.registry, version=__version__)
        self.http = WebServer(create_app(ctx), cfg.http.bind, port).start()
        self._housekeeping = threading.Thread(target=self._housekeep, name="housekeeping", daemon=True)
        self._housekeeping.start()

    def _housekeep(self) -> None:
        """Every HOUSEKEEPING_S: the store's old telemetry points and expired sessions go (housekeep)."""
        while True:
            if self.store is not None:
                try:
                    housekeep(self.store, self.cfg.store.telemetry_retention_h, now_ms())
                except KestrelError as exc:  # the store is away: the next round tries again
                    log.warning("housekeeping: %s", exc)
            if self._housekeeping_stop.wait(HOUSEKEEPING_S):
                return

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
        self._housekeeping_stop.set()
        if self._housekeeping is not None:
            self._housekeeping.join(10)
        if self.http is not None:
            self.http.stop()
        if self.renewer is not None:
            self.renewer.stop()
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
        grpc = {"port": self.grpc_port, "running": self.grpc_server is not None, "tls": True,
                "refused": self.grpc_auth.counts() if self.grpc_auth is not None else {}}
        return {"ok": ok, "store": store, "broker": broker, "ingest": ingest, "grpc": grpc}


def housekeep(store: Store, retention_h: float, now: int) -> Tuple[int, int]:
    """Delete telemetry points older than ``retention_h`` ([store] telemetry_retention_h) and sessions
    expired by ``now``; (points, sessions) deleted."""
    return store.prune_series(now - int(retention_h * 3600 * 1000)), store.prune_sessions(now)


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
