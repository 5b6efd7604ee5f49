"""The whole Kestrel loop on one machine, as real processes: keys -> hub -> signed bundles -> edge -> frames back.

Used by ``python -m demo`` (``make demo``) and by tests/e2e. ``python -m hub serve`` (embedded Mosquitto,
SQLite) and ``python -m edge run`` run as subprocesses; bundles are pushed and deployed over the hub's
gRPC API. Every wait is a condition with a timeout (:func:`wait_for`); nothing sleeps for synchronisation.

    with Loop(work_dir) as loop:
        loop.make_keys()                       # `kestrel-train keygen`
        loop.start_hub()
        loop.push(bundle_bytes); loop.deploy("digits", 1)
        loop.start_edge(loop.write_edge_config(source={...}))
        loop.wait_device(version=1, state="COMMITTED")
        ...
    # __exit__ stops the edge and the hub (SIGTERM, then SIGKILL if they hang) even on failure

SIGTERM stops a run as Ctrl-C does: see demo/procs.py (processes, tools, waits, the stop signal).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from demo.access import HubAccess
from demo.edgeconf import identity_settings, toml_doc, unpack_identity
from demo.procs import (
    REPO,
    STOP_TIMEOUT_S,
    LoopError,
    Proc,
    Stopped,
    child_env,
    install_stop_handlers,
    pid_alive,
    run_tool,
    tail,
    uninterrupted,
    wait_for,
)

__all__ = ["DEVICE_ID", "GROUP", "REPO", "Loop", "LoopError", "Proc", "Stopped", "broker_gone", "child_env",
           "edge_summary", "http_json", "install_stop_handlers", "pid_alive", "run_tool", "tail", "toml_doc",
           "uninterrupted", "wait_for"]

DEVICE_ID = "cam-1"
GROUP = "demo"
HUB_START_S = 30.0
EXPORT_TIMEOUT_S = 120.0


def http_json(url: str, timeout: float = 5.0) -> tuple:
    """(status, parsed JSON body or None); (0, None) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, None
    except (OSError, ValueError):
        return 0, None


class Loop:
    """One hub and one edge device in ``work`` (keys, hub data, device data, logs, export)."""

    def __init__(self, work: Path, device_id: str = DEVICE_ID, group: str = GROUP) -> None:
        self.work = Path(work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.device_id, self.group = device_id, group
        self.hub: Optional[Proc] = None
        self.edge: Optional[Proc] = None
        self.hub_info: Dict[str, Any] = {}
        self.priv_path: Optional[Path] = None
        self.trust_dir = self.work / "trust"
        self.hub_dir = self.work / "hub-data"
        self.tools_log = self.work / "tools.log"  # output of the commands run to completion (keygen, export ...)
        self.edge_dir = self.work / "edge-data"
        self.credentials = self.work / "credentials"  # the device's identity, as systemd LoadCredential= passes it
        self.identity: Dict[str, Any] = {}  # the bundle's edge.toml snippet once enrolled
        self.access = HubAccess(self.work, self.work / "hub.toml", self.tools_log, run_tool)  # tokens, CA
        self._client: Any = None
        self._store: Any = None
        self._procs: List[Proc] = []  # every process this loop started, in order

    def _spawn(self, name: str, argv: List[str], log: Path, env: Optional[Mapping[str, str]] = None) -> Proc:
        with uninterrupted():  # started and recorded, or neither
            proc = Proc(name, argv, log, env=env)
            self._procs.append(proc)
        return proc

    def __enter__(self) -> Loop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- keys ----
    def make_keys(self) -> Path:
        """`kestrel-train keygen`: an Ed25519 signing key (keys/signing.key) and its public half, copied to
        trust/ (what hub and edge trust)."""
        from proto.keys import PRIVATE_NAME, PUBLIC_NAME

        keys = self.work / "keys"
        run_tool([sys.executable, "-m", "trainer", "keygen", "--out", str(keys)], self.tools_log)
        priv, pub = keys / PRIVATE_NAME, keys / PUBLIC_NAME
        self.trust_dir.mkdir(exist_ok=True)
        shutil.copyfile(pub, self.trust_dir / pub.name)
        self.priv_path = priv
        return priv

    # ---- hub ----
    def write_hub_config(self) -> Path:
        path = self.work / "hub.toml"
        path.write_text(toml_doc({
            "hub": {"data_dir": str(self.hub_dir)},
            "store": {"url": ""},                                    # SQLite in data_dir
            "mqtt": {"host": "", "retry_initial_s": 0.05, "retry_max_s": 0.5},  # embedded Mosquitto
            "grpc": {"bind": "127.0.0.1", "port": 0},
            "http": {"bind": "127.0.0.1", "port": 0},
            "registry": {"trust_dir": str(self.trust_dir)},
        }))
        return path

    def start_hub(self, timeout: float = HUB_START_S) -> Dict[str, Any]:
        cfg = self.write_hub_config()
        info = self.hub_dir / "hub.json"
        if info.exists():
            info.unlink()
        self.hub = self._spawn("hub", [sys.executable, "-m", "hub", "serve", "--config", str(cfg)],
                               self.work / "hub.log")
        hub = self.hub

        def ready() -> bool:
            hub.check_running()
            return info.exists()

        wait_for(ready, timeout, interval=0.05, what="the hub to write hub.json")
        self.hub_info = json.loads(info.read_text())

        def healthy() -> bool:
            hub.check_running()
            return bool(self.health()[0] == 200)

        wait_for(healthy, timeout, interval=0.05, what="hub /healthz 200")
        self.access.hub_started(self.hub_info)
        return self.hub_info

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.hub_info['grpc_port']}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.hub_info['http_port']}"

    def health(self) -> tuple:
        return http_json(self.http_base + "/healthz")

    def broker_pid(self) -> Optional[int]:
        p = self.hub_dir / "broker" / "broker.json"
        try:
            return int(json.loads(p.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None

    @property
    def client(self) -> Any:
        if self._client is None:
            from proto.hubclient import HubClient

            self._client = HubClient(self.grpc_target, timeout_s=30.0, creds=self.access.credentials("operator"))
        return self._client

    @property
    def store(self) -> Any:
        """The hub's own SQLite store, opened next to the running hub (WAL allows it)."""
        if self._store is None:
            from hub.store.open import open_store

            self._store = open_store(str(self.hub_info.get("store") or self.hub_dir / "hub.db"))
        return self._store

    # ---- registry, fleet ----
    def push(self, data: bytes) -> Any:
        """PushModel as the trainer (its token may push, nothing else; ``client`` is the operator's)."""
        from proto.hubclient import HubClient

        with HubClient(self.grpc_target, timeout_s=60.0, creds=self.access.credentials("trainer")) as trainer:
            return trainer.push(data)

    def deploy(self, model_name: str, version: int) -> Any:
        return self.client.deploy(model_name, version, group=self.group)

    def rollback(self) -> Dict[str, Any]:
        """`kestrel-hub rollback --group GROUP`; its JSON answer (desired, topic)."""
        r = run_tool([sys.executable, "-m", "hub", "rollback", "--hub", self.grpc_target, "--group", self.group,
                      "--json", *self.access.args("operator")], self.tools_log)
        return dict(json.loads(r.stdout.decode().strip().splitlines()[-1]))

    def device(self) -> Any:
        """This device's record as the hub's Fleet.ListDevices reports it (None before its first status)."""
        for d in self.client.list_devices(self.group):
            if d.device_id == self.device_id:
                return d
        return None

    def wait_device(self, version: int, state: str, timeout: float = 30.0) -> Any:
        """Wait until the hub sees the device reporting ``version`` in update state ``state``."""
        def cond() -> Any:
            if self.edge is not None:
                self.edge.check_running()
            d = self.device()
            if d is not None and d.reported.version == version and d.versions.update_state == state:
                return d
            return None

        try:
            return wait_for(cond, timeout, interval=0.1, what=f"{self.device_id} to report v{version} {state}")
        except AssertionError as exc:
            d = self.device()
            seen = (f"v{d.reported.version} {d.versions.update_state} {d.versions.reason!r}" if d is not None
                    else "no status yet")
            raise LoopError(f"{exc} (hub sees: {seen}); edge log:\n{tail(self.work / 'edge.log')}") from None

    # ---- the device's identity ----
    def enrol(self) -> Dict[str, Any]:
        """`kestrel-hub devices add DEVICE --group GROUP`: its identity bundle, unpacked into the
        credentials directory the edge daemon gets as $CREDENTIALS_DIRECTORY (demo.identity); returns the
        bundle's edge.toml snippet with the credential paths made relative (looked up there)."""
        bundles = self.work / "identity"
        run_tool([sys.executable, "-m", "hub", "devices", "add", self.device_id, "--group", self.group,
                  "--config", str(self.work / "hub.toml"), "--out", str(bundles)], self.tools_log)
        try:
            self.identity = unpack_identity(bundles / f"{self.device_id}.identity.tar", self.credentials)
        except ValueError as exc:
            raise LoopError(str(exc)) from exc
        return self.identity

    # ---- edge ----
    def edge_sections(self) -> Dict[str, Dict[str, Any]]:
        """The edge config this loop needs (device, broker, hub, trust, and its identity from
        :meth:`enrol` when the hub's broker speaks TLS); callers add source and model."""
        if self.hub_info.get("mqtt_tls") and not self.identity:
            self.enrol()
        id_mqtt, id_update = identity_settings(self.identity, self.hub_dir / "security" / "fleet.pub",
                                               lambda: (self.access.ca_file, str(self.access.token_file("device"))))
        mqtt = {"host": self.hub_info["mqtt_host"], "port": int(self.hub_info["mqtt_port"]), **id_mqtt,
                "reconnect_min_s": 0.1, "reconnect_max_s": 1.0}
        update = {"trust_dir": str(self.trust_dir), "hub_grpc": self.grpc_target, "trial_frames": 20,
                  "trial_seconds": 1.0, **id_update}
        return {
            "device": {"id": self.device_id, "group": self.group, "data_dir": str(self.edge_dir)},
            "mqtt": mqtt,
            "spool": {"max_bytes": 16 * 1024 * 1024},
            "telemetry": {"interval_s": 1.0, "metrics_port": 0},
            "update": update,
        }

    def write_edge_config(self, **sections: Mapping[str, Any]) -> Path:
        """edge.toml from :meth:`edge_sections`, each keyword a section merged over it."""
        doc = self.edge_sections()
        for name, fields in sections.items():
            doc.setdefault(name, {}).update(fields)
        path = self.work / "edge.toml"
        path.write_text(toml_doc(doc))
        return path

    def start_edge(self, config: Path) -> Proc:
        env = {"CREDENTIALS_DIRECTORY": str(self.credentials)} if self.identity else None
        self.edge = self._spawn("edge", [sys.executable, "-m", "edge", "run", "--config", str(config)],
                                self.work / "edge.log", env=env)
        return self.edge

    # ---- frames, export ----
    def frames(self, limit: int = 10000) -> List[Any]:
        return list(self.store.list_frames(device_id=self.device_id, limit=limit))

    def wait_frames(self, model_name: str, version: int, n: int = 3, timeout: float = 30.0) -> List[Any]:
        """Wait until ``n`` frames of ``model_name`` ``version`` are in the hub's store."""
        def cond() -> List[Any]:
            if self.edge is not None:
                self.edge.check_running()
            got = [f for f in self.frames() if f.model_name == model_name and f.model_version == version]
            return got if len(got) >= n else []

        try:
            return wait_for(cond, timeout, interval=0.1, what=f"{n} frames of v{version} in the hub's store")
        except AssertionError as exc:
            raise LoopError(f"{exc}; edge log:\n{tail(self.work / 'edge.log')}") from None

    def export(self, out: Path) -> subprocess.CompletedProcess:
        """`kestrel-hub export --force` of the labelled frames to ``out``; LoopError if it fails."""
        return run_tool([sys.executable, "-m", "hub", "export", "--config", str(self.work / "hub.toml"),
                         "--out", str(out), "--force"], self.tools_log, timeout=EXPORT_TIMEOUT_S)

    # ---- shutdown ----
    def stop_edge(self) -> int:
        if self.edge is None:
            return 0
        rc = self.edge.stop()
        if self.edge.killed:
            raise LoopError(f"the edge daemon did not stop within {STOP_TIMEOUT_S}s of SIGTERM (killed)")
        return rc

    def stop_hub(self) -> int:
        if self.hub is None:
            return 0
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._store is not None:
            self._store.close()
            self._store = None
        rc = self.hub.stop()
        if self.hub.killed:
            raise LoopError(f"the hub did not stop within {STOP_TIMEOUT_S}s of SIGTERM (killed)")
        return rc

    def close(self) -> None:
        """Stop every process this loop started, the last started first (the edge before the hub); never
        raises."""
        broker = self.broker_pid()
        for proc in reversed(self._procs):
            try:
                proc.stop()
            except Exception:  # noqa: BLE001 - cleanup must go on
                pass
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._store is not None:
            try:
                self._store.close()
            except Exception:  # noqa: BLE001
                pass
            self._store = None
        if broker is not None and pid_alive(broker):  # the hub should have taken it down; make sure
            try:
                os.kill(broker, signal.SIGTERM)
            except OSError:
                pass


def broker_gone(pid: Optional[int], timeout: float = 10.0) -> bool:
    """True once the embedded Mosquitto ``pid`` has exited."""
    if pid is None:
        return True
    try:
        wait_for(lambda: not pid_alive(pid), timeout, interval=0.05, what=f"mosquitto pid {pid} to exit")
    except AssertionError:
        return False
    return True


def edge_summary(log: Path) -> Dict[str, Any]:
    """The edge daemon's last ``summary`` log line (JSON) as a dict."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "edge.daemon: summary " in ln]
    if not lines:
        raise LoopError(f"the edge daemon logged no summary; see {log}")
    return dict(json.loads(lines[-1].split("edge.daemon: summary ", 1)[1]))
