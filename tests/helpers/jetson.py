"""Test inputs for the Jetson image tools: a device identity bundle made by the real `kestrel-hub devices
add` (:func:`enrolled_identity`) or by hand with a throwaway fleet CA (:func:`identity_members`, for
bundles the hub would never write), and a stand-in Linux_for_Tegra whose NVIDIA scripts only record how
they were called (the real ones flash hardware)."""

from __future__ import annotations

import datetime
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PASSWORD = "correct horse battery staple"
REPO = Path(__file__).resolve().parents[2]
HUB_HOST = "hub.example.net"


def enrolled_identity(work: Path, name: str = "cam-7", group: str = "lobby") -> Path:
    """NAME.identity.tar from the real `kestrel-hub devices add NAME --group GROUP --password` of a hub
    whose data lives in ``work`` (its own fleet CA and fleet key), for devices that reach it as HUB_HOST."""
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "hub.toml"
    cfg.write_text(f'[hub]\ndata_dir = "{work / "hub"}"\n')
    r = subprocess.run([sys.executable, "-m", "hub", "devices", "add", name, "--group", group, "--password",
                        "--mqtt", f"{HUB_HOST}:8883", "--hub-grpc", f"{HUB_HOST}:50051", "--config", str(cfg),
                        "--out", str(work)], cwd=str(REPO), capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr[-2000:]
    return work / f"{name}.identity.tar"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def fleet_ca_and_device(name: str) -> Tuple[bytes, bytes, bytes]:
    """(ca.crt, device.crt, device.key) in PEM: a throwaway fleet CA and the device's certificate, CN = name."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("kestrel test fleet CA")).issuer_name(_name("kestrel test "
          "fleet CA")).public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=30)).sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


def identity_members(name: str = "cam-7", group: str = "lobby", password: bool = True) -> Dict[str, bytes]:
    ca, cert, key = fleet_ca_and_device(name)
    creds = "/etc/kestrel/credentials"
    info = {"schema": 1, "device_id": name, "group": group, "mqtt_host": "hub.example.net", "mqtt_port": 8883,
            "hub_grpc": "hub.example.net:50051", "created_ms": 1_760_000_000_000}
    snippet = (f'[device]\nid = "{name}"\ngroup = "{group}"\n\n'
               f'[mqtt]\nhost = "hub.example.net"\nport = 8883\ntls = true\nca_file = "{creds}/ca.crt"\n'
               f'cert_file = "{creds}/device.crt"\nkey_file = "{creds}/device.key"\n'
               + (f'username = "{name}"\npassword_file = "{creds}/mqtt-password"\n' if password else "")
               + '\n[update]\nhub_grpc = "hub.example.net:50051"\ntrust_dir = "/etc/kestrel/trust"\n')
    out = {"identity.json": json.dumps(info).encode(), "edge.toml": snippet.encode(), "ca.crt": ca,
           "device.crt": cert, "device.key": key}
    if password:
        out["mqtt-password"] = b"s3cret-mqtt-password\n"
    return out


def write_identity(path: Path, members: Dict[str, bytes]) -> Path:
    """NAME.identity.tar: a flat ustar tar, mode 0600, as `kestrel-hub devices add` writes it."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    path.chmod(0o600)
    return path


RECORDER = """#!/bin/sh
# stand-in for NVIDIA's {name}: records how it was called (and what the rootfs looked like then)
{{
  printf '%s' "{name}"; for a in "$@"; do printf ' [%s]' "$a"; done; printf ' cwd=%s' "$(pwd)"
  [ -e rootfs/etc/kestrel/edge.toml ] && printf ' edge.toml=%s' "$(stat -c %a:%g rootfs/etc/kestrel/edge.toml)"
  printf '\\n'
}} >> "{log}"
{extra}
"""


def stand_in_l4t(root: Path, release: str = "# R32 (release), REVISION: 7.1, GCID: 0, BOARD: t210ref, EABI: aarch64",
                 python: Optional[str] = "usr/bin/python3.8") -> Tuple[Path, Path]:
    """A Linux_for_Tegra whose scripts record their calls into calls.log; returns (l4t, log)."""
    l4t = root / "Linux_for_Tegra"
    log = root / "calls.log"
    rootfs = l4t / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "usr/bin").mkdir(parents=True)
    (rootfs / "etc/os-release").write_text('NAME="Ubuntu"\nVERSION_ID="18.04"\n')
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (rootfs / "etc/group").write_text("root:x:0:\nvideo:x:44:\n")
    if python:
        (rootfs / python).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / python).write_text("#!/bin/sh\n")
    (l4t / "nv_tegra").mkdir()
    (l4t / "nv_tegra/bsp_version").write_text(release + "\n")
    scripts = {"flash.sh": "", "tools/l4t_create_default_user.sh": "",
               "tools/jetson-disk-image-creator.sh": "",
               "tools/kernel_flash/l4t_initrd_flash.sh": "",
               # the real one unpacks NVIDIA's drivers into the rootfs, which leaves this file
               "apply_binaries.sh": f"printf '{release}\\n' > rootfs/etc/nv_tegra_release"}
    for rel, extra in scripts.items():
        p = l4t / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(RECORDER.format(name=rel, log=log, extra=extra))
        p.chmod(0o755)
    return l4t, log


def calls(log: Path) -> List[str]:
    return log.read_text().splitlines() if log.exists() else []


def fake_tool(bin_dir: Path, name: str, log: Path, extra: str = "") -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    p = bin_dir / name
    p.write_text(RECORDER.format(name=name, log=log, extra=extra))
    p.chmod(0o755)
    return p


def tree(root: Path) -> Dict[str, Tuple[int, int, int, int, int]]:
    """path -> (mode, uid, gid, size, mtime_ns) of everything under root (symlinks not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)
    return out


def write_overlay(root: Path, board: object, identity: Path, trust: Path, bundle: Optional[Path],
                  wheelhouse: Path, requirement: str = "kestrel[edge]==0.1.0") -> list:
    """The overlay written into ``root`` as `make flash-image` writes it into NVIDIA's rootfs (a minimal
    passwd/group stands in for the sample rootfs's); returns the entries."""
    from jetson import boards, overlay
    from jetson.identity import read_identity

    b = boards.board(board) if isinstance(board, str) else board
    (root / "etc").mkdir(parents=True, exist_ok=True)
    if not (root / "etc/passwd").exists():
        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\nvideo:x:44:\n")
    items = overlay.entries(b, read_identity(str(identity)), [trust], bundle, wheelhouse, requirement)  # type: ignore[arg-type]
    overlay.create_user(root)
    overlay.write_tree(items, root)
    return items
