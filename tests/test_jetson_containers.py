"""The containers, checked without a Docker engine (none runs here): the edge's Dockerfile on NVIDIA's l4t
base image and the hub's, with hadolint's rules written as tests; the hub's compose file with Mosquitto
and MongoDB as `docker compose config` would check it (it parses, every service, volume, healthcheck,
dependency and mounted file is there); the files it mounts by what reads them (the hub's own config
loader, a real Mosquitto started on the compose file's mosquitto.conf).
Not run here: building the images, `docker compose up`, the edge container on a Jetson."""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import yaml

from hub import config as hubconfig
from tests.helpers.broker import free_port
from tests.helpers.wait import wait_for

REPO = Path(__file__).resolve().parents[1]
EDGE_DOCKERFILE = REPO / "jetson/docker/Dockerfile"
HUB_DOCKERFILE = REPO / "hub/deploy/Dockerfile"
COMPOSE = REPO / "hub/deploy/compose.yaml"


def instructions(path: Path) -> List[Tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: List[Tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def hadolint_problems(path: Path) -> List[str]:
    """A subset of hadolint's rules (DLxxxx), the ones that apply to images like ours."""
    ins = instructions(path)
    problems = []
    froms = [v for k, v in ins if k == "FROM"]
    for f in froms:
        image = f.split()[0]
        if image.startswith("${"):  # an ARG: judge its default
            name = image.strip("${}")
            image = next((v.split("=", 1)[1] for k, v in ins if k == "ARG" and v.startswith(name + "=")), "")
        if ":" not in image.rsplit("/", 1)[-1]:
            problems.append(f"DL3006 untagged base image {image}")
        if image.endswith(":latest"):
            problems.append(f"DL3007 base image {image} uses latest")
    for k, v in ins:
        if k == "ADD":
            problems.append(f"DL3020 ADD instead of COPY: {v}")
        if k == "RUN":
            if re.search(r"\bsudo\b", v):
                problems.append("DL3004 sudo in RUN")
            if re.search(r"(^|&&)\s*cd\s", v):
                problems.append("DL3003 cd in RUN (use WORKDIR)")
            if "apt-get install" in v:
                if "--no-install-recommends" not in v:
                    problems.append("DL3015 apt-get install without --no-install-recommends")
                if not re.search(r"apt-get install[^&]*\s-y\b", v):
                    problems.append("DL3014 apt-get install without -y")
                if "rm -rf /var/lib/apt/lists/*" not in v:
                    problems.append("DL3009 apt lists not deleted in the same RUN")
                if "apt-get update" not in v:
                    problems.append("DL3027/DL3009 apt-get install without apt-get update in the same RUN")
            if re.search(r"pip install", v) and "--no-cache-dir" not in v:
                problems.append("DL3042 pip install without --no-cache-dir")
            if "|" in v.replace("||", "") and "pipefail" not in v:
                problems.append("DL4006 a pipe without set -o pipefail")
        if k in ("CMD", "ENTRYPOINT") and not v.startswith("["):
            problems.append(f"DL3025 {k} not in JSON form")
    users = [v for k, v in ins if k == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append("DL3002 the last USER is root")
    if not any(k == "HEALTHCHECK" for k, _ in ins):
        problems.append("no HEALTHCHECK")
    return problems


@pytest.mark.parametrize("path", [EDGE_DOCKERFILE, HUB_DOCKERFILE], ids=["edge", "hub"])
def test_dockerfiles_follow_hadolint_rules(path: Path) -> None:
    assert hadolint_problems(path) == []


def test_the_rules_catch_what_they_are_for(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nADD x /x\nRUN cd /x && apt-get install curl\nRUN pip install foo | tee log\n"
                   "CMD run.sh\n")
    got = " ".join(hadolint_problems(bad))
    for rule in ("DL3006", "DL3020", "DL3003", "DL3015", "DL3014", "DL3009", "DL3042", "DL4006", "DL3025",
                 "DL3002", "HEALTHCHECK"):
        assert rule in got, rule


def test_edge_image_is_nvidias_l4t_and_installs_offline() -> None:
    ins = instructions(EDGE_DOCKERFILE)
    base = next(v for k, v in ins if k == "ARG" and v.startswith("L4T_BASE="))
    assert base == "L4T_BASE=nvcr.io/nvidia/l4t-base:r32.7.1"
    runs = " ".join(v for k, v in ins if k == "RUN")
    assert "--no-index --find-links /opt/kestrel/wheelhouse" in runs and "--without-pip" in runs
    wheel_arg = next(v for k, v in ins if k == "ARG" and v.startswith("WHEELHOUSE=")).split("=", 1)[1]
    assert wheel_arg == "build/jetson/jetson-nano/wheelhouse"  # what `python -m jetson wheelhouse` writes
    pip_pin = re.search(r"pip-([\d.]+)-py3-none-any\.whl", runs)
    from jetson import boards

    assert pip_pin and f"pip=={pip_pin.group(1)}" == boards.board("jetson-nano").pip_pin
    assert next(v for k, v in ins if k == "ENTRYPOINT") == '["/opt/kestrel/venv/bin/kestrel-edge"]'


def test_hub_image_copies_only_what_exists() -> None:
    for k, v in instructions(HUB_DOCKERFILE):
        if k == "COPY":
            for src in shlex.split(v)[:-1]:
                assert (REPO / src).exists(), src


def compose() -> Dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_is_complete() -> None:
    c = compose()
    services = c["services"]
    assert set(services) == {"hub", "mosquitto", "mongodb"}
    declared = set(c["volumes"])
    used = set()
    for name, svc in services.items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), (name, image)
        hc = svc["healthcheck"]
        assert hc["test"][0] == "CMD" and len(hc["test"]) > 1 and hc["interval"] and hc["retries"] >= 1, name
        assert svc["restart"] == "unless-stopped"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (COMPOSE.parent / src).is_file(), (name, src)  # a mounted file that exists
            else:
                used.add(src)
        for port in svc.get("ports", []):
            host, container = port.split(":")
            assert 0 < int(host) < 65536 and 0 < int(container) < 65536
    assert used == declared  # every named volume declared and used
    hub = services["hub"]
    assert hub["depends_on"] == {"mosquitto": {"condition": "service_healthy"},
                                 "mongodb": {"condition": "service_healthy"}}
    build = hub["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == HUB_DOCKERFILE
    assert "$$SYS" in COMPOSE.read_text()  # compose would otherwise interpolate $SYS


def test_compose_hub_config_is_valid_and_points_at_the_services() -> None:
    cfg = hubconfig.load(COMPOSE.parent / "hub.toml")
    assert cfg.store_url == "mongodb://mongodb:27017/kestrel" and cfg.mqtt.host == "mosquitto"
    ports = {p.split(":")[1] for p in compose()["services"]["hub"]["ports"]}
    assert {str(cfg.grpc.port), str(cfg.http.port)} == ports and cfg.grpc.bind == cfg.http.bind == "0.0.0.0"
    mounted = compose()["services"]["hub"]["volumes"]
    assert any(v.startswith(f"hub-data:{cfg.hub.data_dir}") for v in mounted)


def test_compose_mosquitto_conf_runs_on_a_real_mosquitto(tmp_path: Path) -> None:
    port = free_port()
    conf = (COMPOSE.parent / "mosquitto.conf").read_text()
    assert "listener 1883" in conf
    data = tmp_path / "data"
    data.mkdir()
    conf = conf.replace("listener 1883", f"listener {port} 127.0.0.1").replace("/mosquitto/data/", f"{data}/")
    (tmp_path / "mosquitto.conf").write_text(conf)
    proc = subprocess.Popen(["mosquitto", "-c", str(tmp_path / "mosquitto.conf")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        def accepting() -> bool:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(accepting, 20, what="mosquitto on the compose file's config")
    finally:
        proc.terminate()
        proc.wait(10)
