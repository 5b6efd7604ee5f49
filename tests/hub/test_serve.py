"""`kestrel-hub serve`: config checks, embedded broker, health and metrics, gRPC wiring."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from hub.store.sqlite import SqliteStore
from proto import kestrel_pb2, kestrel_pb2_grpc, topics
from tests.helpers.wait import wait_for
from tests.hub import REPO, HubProcess, enrol, frame_payload, hub_identity, publish_all, write_config


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hub", *args], cwd=str(REPO), capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)


def test_check_config_ok_and_unknown_key_rejected(tmp_path: Path) -> None:
    good = write_config(tmp_path / "good.toml", tmp_path / "d", "127.0.0.1", 1883)
    r = run_cli("serve", "--config", str(good), "--check-config")
    assert r.returncode == 0, r.stderr
    assert "config OK" in r.stdout and "127.0.0.1:1883" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nhost = "x"\nshare_grup = "oops"\n')
    r = run_cli("serve", "--config", str(bad), "--check-config")
    assert r.returncode == 2
    assert "unknown key 'mqtt.share_grup'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("serve", "--print-config-doc")
    assert r.returncode == 0 and "`mqtt.max_payload_bytes`" in r.stdout and "[registry]" in r.stdout


def get(url: str) -> tuple:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_serve_with_embedded_broker_health_metrics_grpc(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    cfg = write_config(tmp_path / "hub.toml", data)  # no broker configured: embedded Mosquitto
    hub = HubProcess(cfg, data, tmp_path / "hub.log").start()
    try:
        assert hub.info["mqtt_embedded"] is True
        host, port = str(hub.info["mqtt_host"]), int(hub.info["mqtt_port"])  # type: ignore[arg-type]
        base = f"http://127.0.0.1:{hub.info['http_port']}"
        wait_for(lambda: get(base + "/healthz")[0] == 200, 15, what="healthy hub")
        assert hub.info["mqtt_tls"] is True  # the default path is the secure path
        cam = enrol(cfg, "cam-1", tmp_path / "ids")
        tls = {"ca_file": str(cam["ca.crt"]), "cert_file": str(cam["device.crt"]), "key_file": str(cam["device.key"])}
        publish_all(host, port, [(topics.frames("cam-1"), frame_payload("e1", "cam-1")),
                                 (topics.frames("cam-1"), b"junk")], **tls)
        # a device may not publish on another's topic; the hub's identity may (the ingest still checks it)
        publish_all(host, port, [(topics.frames("cam-9"), frame_payload("e2", "cam-1"))], **hub_identity(data))
        store = SqliteStore(data / "hub.db")
        wait_for(lambda: store.count_frames() == 1, 10, what="frame stored")
        wait_for(lambda: json.loads(get(base + "/healthz")[1])["ingest"]["acked"] == 3, 10, what="3 acks")
        status, body = get(base + "/healthz")
        h = json.loads(body)
        assert status == 200 and h["ok"] is True
        assert h["store"]["ok"] is True and h["broker"]["embedded"] is True
        assert h["store"]["image_writes"] >= 1 and h["store"]["checkpoints"] >= 0  # the SQLite store's own figures
        assert h["broker"]["connected"] is True
        assert h["ingest"]["rejected"]["bad_protobuf"] == 1
        assert h["ingest"]["rejected"]["device_mismatch"] == 1
        status, text = get(base + "/metrics")
        assert status == 200
        assert 'kestrel_hub_ingest_rejected_total{reason="bad_protobuf"} 1.0' in text
        assert "kestrel_hub_ingest_stored_total 1.0" in text and "kestrel_hub_store_up 1.0" in text
        assert "kestrel_hub_ingest_commit_seconds_count" in text and "kestrel_hub_frames_unlabelled 1.0" in text
        assert 'kestrel_hub_frame_received_to_stored_seconds_count 1.0' in text
        # the gRPC registry answers on the bound port
        with hub.grpc_client() as client:  # TLS with the hub's fleet CA, its first admin token
            assert client.list_models() == []
        with grpc.insecure_channel(f"127.0.0.1:{hub.info['grpc_port']}") as ch:  # no plain text on that port
            with pytest.raises(grpc.RpcError) as ei:
                kestrel_pb2_grpc.ModelRegistryStub(ch).ListModels(kestrel_pb2.ListModelsRequest(), timeout=10)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        # the embedded broker is supervised: killed, it comes back on the same port and the ingest reconnects
        broker_info = json.loads((data / "broker" / "broker.json").read_text())
        os.kill(int(broker_info["pid"]), signal.SIGKILL)
        wait_for(lambda: json.loads(get(base + "/healthz")[1])["broker"].get("restarts", 0) >= 1, 15,
                 what="broker restarted")
        wait_for(lambda: json.loads(get(base + "/healthz")[1])["broker"]["connected"], 15, what="reconnected")
        publish_all(host, port, [(topics.frames("cam-1"), frame_payload("e3", "cam-1"))], **tls)
        wait_for(lambda: store.count_frames() == 2, 15, what="frame after the broker restart")
        store.close()
    finally:
        assert hub.stop() == 0
    assert not (data / "hub.json.tmp").exists()


def test_embedded_broker_dies_with_a_killed_hub(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    hub = HubProcess(write_config(tmp_path / "hub.toml", data), data, tmp_path / "hub.log").start()
    pid = int(json.loads((data / "broker" / "broker.json").read_text())["pid"])
    os.kill(pid, 0)  # alive
    hub.kill()

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie counts as gone (its parent, the hub, is dead; init reaps it)
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"

    wait_for(gone, 10, what="embedded mosquitto to exit after the hub was killed")
    hub.stop()


def test_healthz_is_503_when_unhealthy_and_metrics_render(tmp_path: Path) -> None:
    """The web app on its uvicorn server with a health snapshot that says unhealthy (the store down)."""
    from prometheus_client.parser import text_string_to_metric_families

    from hub.config import HttpSection
    from hub.metrics import HubMetrics
    from hub.web.app import create_app
    from hub.web.context import WebContext
    from hub.web.server import WebServer
    state = {"ok": False, "store": {"ok": False, "error": "injected"}, "broker": {"connected": True},
             "ingest": {"paused": True, "stored": 7, "rejected": {"too_large": 2}}}
    store = SqliteStore(tmp_path / "hub.db")
    app = create_app(WebContext(store=store, http=HttpSection(), health=lambda: state,
                                metrics=HubMetrics(lambda: state, lambda: store)))
    srv = WebServer(app, "127.0.0.1", 0).start()
    try:
        status, body = get(f"http://127.0.0.1:{srv.port}/healthz")
        assert status == 503 and json.loads(body)["store"]["error"] == "injected"
        status, text = get(f"http://127.0.0.1:{srv.port}/metrics")
        assert status == 200
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}
        assert samples[("kestrel_hub_ingest_paused", ())] == 1 and samples[("kestrel_hub_store_up", ())] == 0
        assert samples[("kestrel_hub_ingest_rejected_total", (("reason", "too_large"),))] == 2
        assert samples[("kestrel_hub_ingest_stored_total", ())] == 7
        assert ("kestrel_hub_frames_unlabelled", ()) not in samples  # the store is down: no fleet figures
        assert get(f"http://127.0.0.1:{srv.port}/nope")[0] == 404
        import socket
        # no Nagle wait on kept-alive connections (about 40 ms per response without it; docs/dashboard.md)
        assert srv.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        srv.stop()
        store.close()


def test_embedded_broker_port_and_client_id_survive_a_restart(tmp_path: Path) -> None:
    """Devices configured with the embedded broker's port reconnect after a hub restart, and the hub's
    MQTT session (client id) is the same one: generated once, kept in data_dir, not the hostname."""
    data = tmp_path / "hub"
    cfg = write_config(tmp_path / "hub.toml", data)
    hub = HubProcess(cfg, data, tmp_path / "hub.log").start()
    first = dict(hub.info)
    assert hub.stop() == 0
    assert (data / "mqtt-client-id").read_text().strip() == first["client_id"]
    hub = HubProcess(cfg, data, tmp_path / "hub.log").start()
    try:
        assert hub.info["mqtt_port"] == first["mqtt_port"] and hub.info["client_id"] == first["client_id"]
        assert str(first["client_id"]).startswith("kestrel-hub-")
    finally:
        assert hub.stop() == 0


def _busy_port() -> tuple:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s, s.getsockname()[1]


def test_busy_ports_and_missing_tls_files_are_one_line_errors(broker, tmp_path: Path) -> None:  # noqa: ANN001
    holder, port = _busy_port()
    try:
        for section in ("grpc", "http"):
            cfg = tmp_path / f"{section}.toml"
            write_config(cfg, tmp_path / section, broker.host, broker.port)
            text = cfg.read_text().replace(f"[{section}]\nport = 0", f"[{section}]\nport = {port}")
            cfg.write_text(text)
            r = run_cli("serve", "--config", str(cfg))
            err = r.stderr.strip().splitlines()
            assert r.returncode == 3, r.stderr[-2000:]
            assert f"cannot listen for {section}" in err[-1].lower()
            assert "Traceback" not in r.stderr and str(port) in err[-1]
    finally:
        holder.close()
    tls = tmp_path / "tls.toml"
    write_config(tls, tmp_path / "tls", "broker.example", 8883,
                 extra_mqtt=f'tls = true\nca_file = "{tmp_path / "missing-ca.pem"}"')
    r = run_cli("serve", "--config", str(tls), "--check-config")
    assert r.returncode == 2 and "ca_file" in r.stderr and "missing-ca.pem" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_label_command_sets_validates_and_clears(tmp_path: Path) -> None:
    from tests.hub.test_store_contract import rec

    data = tmp_path / "hub"
    cfg = write_config(tmp_path / "hub.toml", data, "127.0.0.1", 1883)
    store = SqliteStore(data / "hub.db")
    store.add_frame(rec("f-1"))
    r = run_cli("label", "--config", str(cfg), "f-1", "cat", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["label"] == "cat" and store.get_frame("f-1").label == "cat"  # type: ignore[union-attr]
    for args, why in ((["f-1", "../etc"], "invalid label"), (["nope", "cat"], "does not exist"),
                      (["f-1"], "exactly one of LABEL, --clear or --unusable")):
        r = run_cli("label", "--config", str(cfg), *args)
        assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli("label", "--config", str(cfg), "f-1", "--clear")
    assert r.returncode == 0 and store.get_frame("f-1").label is None  # type: ignore[union-attr]
    store.close()
