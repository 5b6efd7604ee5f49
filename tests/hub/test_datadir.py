"""One hub per data folder (the lock) and the ports a hub chose, kept across restarts."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
from pathlib import Path
from typing import Dict, Tuple

from tests.hub import HubProcess, write_config
from tests.hub.test_serve import run_cli


def snapshot(root: Path) -> Dict[str, Tuple[int, str]]:
    """Every file under ``root``: (mtime_ns, sha256 of its content)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def test_a_second_serve_on_the_same_data_folder_exits_2_naming_the_holder_and_changes_nothing(
        tmp_path: Path) -> None:
    data = tmp_path / "hub"
    cfg = write_config(tmp_path / "hub.toml", data)  # embedded broker: the second would start its own
    hub = HubProcess(cfg, data, tmp_path / "hub.log").start()
    assert hub.proc is not None
    broker_pid = int(json.loads((data / "broker" / "broker.json").read_text())["pid"])
    frozen = [hub.proc.pid, broker_pid]
    try:
        for pid in frozen:  # nothing of the first hub writes while we look
            os.kill(pid, signal.SIGSTOP)
        before = snapshot(data)
        assert "hub.lock" in before and "hub.json" in before and "broker/broker.json" in before
        r = run_cli("serve", "--config", str(cfg))
        assert r.returncode == 2, r.stderr[-2000:]
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and f"pid {hub.proc.pid}" in err[0] and str(data) in err[0], r.stderr
        assert snapshot(data) == before  # not one byte, not one new file
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        assert hub.stop() == 0
    # the lock went with the process: the folder is free again
    again = HubProcess(cfg, data, tmp_path / "hub.log").start()
    assert again.stop() == 0


def test_grpc_and_http_ports_chosen_with_port_0_are_kept_across_restarts(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    cfg = write_config(tmp_path / "hub.toml", data)
    hub = HubProcess(cfg, data, tmp_path / "hub.log").start()
    first = dict(hub.info)
    assert hub.stop() == 0
    assert json.loads((data / "ports.json").read_text()) == {"grpc": first["grpc_port"], "http": first["http_port"]}
    hub = HubProcess(cfg, data, tmp_path / "hub.log").start()
    second = dict(hub.info)
    assert hub.stop() == 0
    assert (second["grpc_port"], second["http_port"], second["mqtt_port"]) == \
        (first["grpc_port"], first["http_port"], first["mqtt_port"])
    # the old gRPC port taken by someone else: a free one, said in the log, and kept from then on
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(first["grpc_port"])))  # type: ignore[call-overload]
        taken.listen(1)
        hub = HubProcess(cfg, data, tmp_path / "hub2.log").start()
        third = dict(hub.info)
        assert hub.stop() == 0
    assert third["grpc_port"] != first["grpc_port"] and third["http_port"] == first["http_port"]
    assert f"the grpc port {first['grpc_port']} of the previous run is taken" in (tmp_path / "hub2.log").read_text()
    assert json.loads((data / "ports.json").read_text())["grpc"] == third["grpc_port"]
