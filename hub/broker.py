"""Which broker the hub talks to: the configured one, or an embedded Mosquitto it supervises.

With ``[mqtt] host`` empty the hub starts ``mosquitto`` on 127.0.0.1 with a generated config under
``<data_dir>/broker/`` (persistence on, saved every ``embedded_autosave_s``, so queued QoS 1 frames
survive a broker restart), restarts it when it dies (same port), and writes ``broker.json``
({"host", "port", "pid"}) atomically so local tools, demos and devices can find it. The port is
``embedded_port``, else the port of the previous run (from broker.json, so devices configured with
it reconnect after a hub restart) when it is still free, else a free one. Its ``max_packet_size`` is
``packet_limit(max_payload_bytes)``: a client sending a larger packet is disconnected before the broker
holds it (the hub's own client announces the same limit in its MQTT 5 CONNECT). The broker dies with the
hub (PR_SET_PDEATHSIG on Linux), even when the hub is SIGKILLed. Its stderr goes to
``mosquitto.stderr`` in the same folder.
"""

from __future__ import annotations

import ctypes
import dataclasses
import getpass
import json
import logging
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

from hub.config import HubConfig
from hub.errors import ConfigError, TransportError
from proto import atomic
from proto.backoff import Backoff

log = logging.getLogger("hub.broker")

START_TIMEOUT_S = 10.0
PACKET_OVERHEAD = 65536 + 64  # an MQTT packet beyond its payload: the longest topic (64 KiB), headers, properties
SUPERVISE_INTERVAL_S = 0.5
RESTART_BACKOFF_MAX_S = 10.0


@dataclasses.dataclass
class BrokerTarget:
    host: str
    port: int
    username: str = ""
    password: str = dataclasses.field(default="", repr=False)  # a secret: never in a log line or repr
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    embedded: bool = False


def packet_limit(max_payload_bytes: int) -> int:
    """The largest MQTT packet that can carry a frame of ``max_payload_bytes`` (any topic): the embedded
    broker's ``max_packet_size`` and the Maximum Packet Size the hub's client announces."""
    return int(max_payload_bytes) + PACKET_OVERHEAD


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    with socket.socket() as s:
        s.settimeout(timeout)
        return s.connect_ex((host, port)) == 0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedBroker:
    """A supervised Mosquitto on loopback. ``start()`` blocks until the port accepts connections."""

    def __init__(self, workdir: Path, port: int = 0, exe: Optional[str] = None, autosave_s: int = 5,
                 listener: Optional[Callable[[int], List[str]]] = None, max_packet_size: int = 0) -> None:
        """``listener(port)``: the listener and authentication lines of the config (hub.security: TLS,
        client certificates, ACL); None = a plain, anonymous listener on 127.0.0.1. ``max_packet_size``:
        packets larger than this are refused (the client is disconnected) on every listener; 0 = no
        limit (Mosquitto's own)."""
        self.exe = exe or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.workdir = Path(workdir)
        self.host = "127.0.0.1"
        self.listener = listener
        self.autosave_s = autosave_s
        self.max_packet_size = int(max_packet_size)
        self.port = port or self._previous_port() or free_port()
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.restarts = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def _previous_port(self) -> int:
        """The port of the last run when it is free again (0 otherwise): devices keep working."""
        try:
            port = int(json.loads((self.workdir / "broker.json").read_text())["port"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0
        if not 0 < port < 65536:
            return 0
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as mosquitto does: TIME_WAIT is fine
            try:
                s.bind((self.host, port))
            except OSError:
                log.warning("the embedded broker's previous port %d is taken; using a free one (devices "
                            "configured with %d must be told the new port, or set [mqtt] embedded_port)",
                            port, port)
                return 0
        return port

    def _write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        access = self.listener(self.port) if self.listener is not None \
            else [f"listener {self.port} {self.host}", "allow_anonymous true"]
        lines = access + [
            "persistence true",
            f"persistence_location {self.workdir}/",
            f"autosave_interval {int(self.autosave_s)}",
            f"log_dest file {self.workdir / 'mosquitto.log'}",
            "log_type error", "log_type warning", "log_type notice",
            "max_queued_messages 100000",
            "max_inflight_messages 1000",  # the hub acks after commit: a deep window keeps batches full
            "persistent_client_expiration 7d",
            # no Nagle on the clients' sockets: a receipt queued behind a PUBACK otherwise waits for the
            # device's delayed ACK (40 ms on Linux; the load generator measured p50 42.7 -> 5.5 ms)
            "set_tcp_nodelay true",
            # bounded before memory: a larger packet is refused on its header (Mosquitto 2's name for it)
            *([f"max_packet_size {self.max_packet_size}"] if self.max_packet_size else []),
            # Mosquitto started as root switches to user 'mosquitto'; changing credentials clears
            # the parent-death signal, so it stays the hub's user (and can write our data dir).
            f"user {getpass.getuser()}",
        ]
        atomic.write_text(conf, "\n".join(lines) + "\n")
        return conf

    def _spawn(self) -> None:
        if not Path(self.exe).exists():
            raise ConfigError("mosquitto is not installed (apt-get install mosquitto) and [mqtt] host "
                              "is empty: install it or configure an external broker")
        conf = self._write_config()
        stderr_path = self.workdir / "mosquitto.stderr"
        # a file, not a pipe: a pipe nobody reads fills up and blocks mosquitto
        with open(stderr_path, "ab") as err_file:
            self.proc = subprocess.Popen([self.exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                         stderr=err_file, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_open(self.host, self.port):
            if self.proc.poll() is not None:
                err = stderr_path.read_text(errors="replace")[-2000:]
                log_file = self.workdir / "mosquitto.log"
                if log_file.exists():
                    err += log_file.read_text(errors="replace")[-1000:]
                raise TransportError(f"embedded mosquitto exited at start (port {self.port}): "
                                     f"{' '.join(err.split())[-600:]}")
            if time.monotonic() > deadline:
                raise TransportError(
                    f"embedded mosquitto did not open port {self.port} in {START_TIMEOUT_S}s")
            time.sleep(0.02)
        atomic.write_text(self.workdir / "broker.json",
                      json.dumps({"host": self.host, "port": self.port, "pid": self.proc.pid}) + "\n")
        log.info("embedded mosquitto pid %d listening on %s:%d", self.proc.pid, self.host, self.port)

    def start(self) -> EmbeddedBroker:
        with self._lock:
            self._spawn()
        self._thread = threading.Thread(target=self._supervise, name="broker-supervisor", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def reload(self) -> None:
        """SIGHUP: Mosquitto rereads its ACL, password file, CRL and certificates (clients stay connected)."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGHUP)

    def _supervise(self) -> None:
        backoff = Backoff(SUPERVISE_INTERVAL_S, RESTART_BACKOFF_MAX_S, stable_s=SUPERVISE_INTERVAL_S)
        while not self._stop.wait(SUPERVISE_INTERVAL_S):
            with self._lock:
                if self._stop.is_set() or self.running:
                    backoff.reset()  # seen running: a later failure waits from the start again
                    continue
                code = self.proc.returncode if self.proc else None
                log.warning("embedded mosquitto died (exit %s); restarting on port %d", code, self.port)
                try:
                    self._spawn()
                    self.restarts += 1
                except (TransportError, OSError) as exc:
                    wait = backoff.next()
                    log.error("restarting embedded mosquitto failed: %s (next try in %.1fs)", exc, wait)
                    self._stop.wait(wait)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        if self._thread is not None:
            self._thread.join(5)


def resolve(cfg: HubConfig) -> BrokerTarget:
    """The configured external broker (embedded=False); call EmbeddedBroker for the embedded case."""
    m = cfg.mqtt
    password = ""
    if m.password_file:
        try:
            password = Path(m.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"[mqtt] password_file {m.password_file}: {exc.strerror}") from exc
    return BrokerTarget(host=m.host, port=m.port or (8883 if m.tls else 1883), username=m.username,
                        password=password, tls=m.tls, ca_file=m.ca_file, cert_file=m.cert_file,
                        key_file=m.key_file)
