"""``kestrel-hub tokens``, ``frames`` and ``label --hub`` as real processes against a real hub (its JSON API)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

from hub.broker import free_port
from tests.helpers.wait import wait_for
from tests.hub import REPO, HubProcess, hub_identity, write_config
from tests.hub.dashboard import http_json, seed_hub

DEVICES = [("cam-a", "lobby"), ("cam-b", "dock")]
PER_DEVICE = 8


def cli(*args: str, env: Dict[str, str] = {}) -> subprocess.CompletedProcess:  # noqa: B006 - never mutated
    return subprocess.run([sys.executable, "-m", "hub", *args], cwd=str(REPO), capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO), **env))


class Hub:
    def __init__(self, proc: HubProcess, frames: Dict[str, Any], config: Path, tmp: Path) -> None:
        self.proc, self.frames, self.config, self.tmp = proc, frames, config, tmp
        self.url = f"http://127.0.0.1:{proc.info['http_port']}"
        self.admin = tmp / "admin.token"
        self.admin.write_text((proc.data_dir / "admin-token").read_text())
        self.admin.chmod(0o600)  # a token file everyone may read is refused


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "hub"
    cfg = write_config(tmp / "hub.toml", data)
    proc = HubProcess(cfg, data, tmp / "hub.log").start()
    try:
        frames = seed_hub(str(proc.info["mqtt_host"]), int(proc.info["mqtt_port"]), DEVICES,  # type: ignore
                          PER_DEVICE, **hub_identity(data))  # the embedded broker speaks TLS
        wait_for(lambda: (proc.health().get("ingest") or {}).get("stored") == len(frames), 30, what="stored")
        yield Hub(proc, frames, cfg, tmp)
    finally:
        proc.stop()


def test_the_first_admin_token_is_in_a_0600_file_and_never_in_the_log(hub: Hub) -> None:
    path = hub.proc.data_dir / "admin-token"
    log = hub.proc.log_path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600 and str(path) in log
    assert path.read_text().strip() not in log and hub.proc.info["admin_token_file"] == str(path)


def test_tokens_add_list_revoke(hub: Hub) -> None:
    r = cli("tokens", "--config", str(hub.config), "add", "lena", "--role", "labeller")
    assert r.returncode == 0, r.stderr
    token = r.stdout.splitlines()[0]
    assert token.startswith("kst_") and len(token) > 40 and "shown only now" in r.stdout
    assert http_json(f"{hub.url}/api/me", token)[1] == {"name": "lena", "role": "labeller",
                                                         "permissions": ["label", "models", "read"]}
    r = cli("tokens", "--config", str(hub.config), "list", "--json")
    listed = {t["name"]: t for t in json.loads(r.stdout)}
    assert listed["lena"]["role"] == "labeller" and listed["lena"]["revoked_ms"] == 0 and "admin" in listed
    assert token not in r.stdout and token[4:] not in cli("tokens", "--config", str(hub.config), "list").stdout
    r = cli("tokens", "--config", str(hub.config), "add", "lena", "--role", "admin")
    assert r.returncode == 2 and "exists already" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("tokens", "--config", str(hub.config), "add", "bad name!", "--role", "viewer")
    assert r.returncode == 2 and "invalid token name" in r.stderr
    assert cli("tokens", "--config", str(hub.config), "revoke", "lena").returncode == 0
    assert http_json(f"{hub.url}/api/me", token)[0] == 401
    r = cli("tokens", "--config", str(hub.config), "revoke", "lena")
    assert r.returncode == 2 and "no active token" in r.stderr


def test_frames_list_filters_and_show_writes_the_image(hub: Hub, tmp_path: Path) -> None:
    base = ["--hub", hub.url, "--token-file", str(hub.admin)]
    r = cli("frames", "list", *base, "--unlabelled", "--device", "cam-b", "--below", "0.45", "--model-version", "2",
            "--json")
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    want = {fid for fid, f in hub.frames.items() if f.device_id == "cam-b" and f.model.version == 2
            and f.top_k[0].score < 0.45}
    assert want and {f["frame_id"] for f in got} == want
    assert [f["capture_time_ms"] for f in got] == sorted((f["capture_time_ms"] for f in got), reverse=True)
    r = cli("frames", "list", *base, "--order", "least_confident", "--limit", "3")
    assert r.returncode == 0 and r.stdout.splitlines()[0].split()[:2] == ["FRAME", "DEVICE"]
    assert len(r.stdout.splitlines()) == 4
    r = cli("frames", "list", *base, "--limit", "0", "--json")  # all of them, across pages
    assert len(r.stdout.splitlines()) == len(hub.frames)
    fid = sorted(want)[0]
    out = tmp_path / "frame.jpg"
    r = cli("frames", "show", fid, *base, "--image", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == hub.frames[fid].image and f"frame     {fid}" in r.stdout
    r = cli("frames", "show", "no-such-frame", *base)
    assert r.returncode == 2 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_label_over_the_api_records_the_token_name(hub: Hub) -> None:
    fid = sorted(hub.frames)[1]
    r = cli("label", "--hub", hub.url, "--token-file", str(hub.admin), fid, "mid", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"frame_id": fid, "label": "mid", "previous": None, "by": "admin"}
    token = hub.admin.read_text().strip()
    frame = http_json(f"{hub.url}/api/frames/{fid}", token)[1]
    assert (frame["label"], frame["labelled_by"]) == ("mid", "admin")
    assert cli("label", "--hub", hub.url, "--token-file", str(hub.admin), fid, "--unusable").returncode == 0
    assert http_json(f"{hub.url}/api/frames/{fid}", token)[1]["unusable"] is True
    r = cli("label", "--hub", hub.url, "--token-file", str(hub.admin), fid, "../etc")
    assert r.returncode == 2 and "invalid label" in r.stderr
    viewer = hub.tmp / "viewer.token"
    viewer.write_text(cli("tokens", "--config", str(hub.config), "add", "vic", "--role", "viewer").stdout)
    viewer.chmod(0o600)
    r = cli("label", "--hub", hub.url, "--token-file", str(viewer), fid, "mid")
    assert r.returncode == 2 and "may not label" in r.stderr
    r = cli("label", "--hub", hub.url, fid, "mid")  # no token at all
    assert r.returncode == 2 and "valid token" in r.stderr
    (hub.tmp / "junk.token").write_text("hello\n")
    (hub.tmp / "junk.token").chmod(0o600)
    r = cli("label", "--hub", hub.url, "--token-file", str(hub.tmp / "junk.token"), fid, "mid")
    assert r.returncode == 2 and "does not hold a hub token" in r.stderr
    r = cli("label", "--hub", f"http://127.0.0.1:{free_port()}", "--token-file", str(hub.admin), fid, "mid")
    assert r.returncode == 3 and "cannot reach the hub" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert http_json(f"{hub.url}/api/frames/{fid}", token)[1]["unusable"] is True  # none of these changed it


def test_label_on_the_store_directly_records_the_cli_user(hub: Hub) -> None:
    fid = sorted(hub.frames)[2]
    r = cli("label", "--config", str(hub.config), fid, "bright", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["by"].startswith("cli")
