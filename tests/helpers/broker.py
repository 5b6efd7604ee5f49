"""A real Mosquitto on a free loopback port with its own config file, for tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional, Tuple

from hub.broker import free_port, port_open

__all__ = ["Mosquitto", "free_port"]  # free_port is the hub's (one free-port helper); tests import it from here too


class Mosquitto:
    """``start()``/``stop()`` keep the same port, so clients can reconnect to a restarted broker."""

    def __init__(self, workdir: Path, port: Optional[int] = None, users: Optional[dict] = None,
                 max_packet_size: int = 0, tls: Optional[Tuple[Path, Path, Path]] = None) -> None:
        """``tls``: (ca, cert, key) files: the listener speaks TLS only (tests/helpers/tlscerts.py)."""
        self.exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(self.exe).exists():
            raise RuntimeError("mosquitto is not installed: apt-get install mosquitto mosquitto-clients")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.users = users or {}
        self.proc: Optional[subprocess.Popen] = None
        self.log = self.workdir / "mosquitto.log"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence false",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_queued_messages 100000",
            "max_inflight_messages 100",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            lines.append("user root")  # as root mosquitto drops to "mosquitto", who cannot read our 0600 files
        if max_packet_size:
            lines.append(f"max_packet_size {max_packet_size}")
        if tls is not None:
            ca, cert, key = tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}", "tls_version tlsv1.2"]
        if self.users:
            pw = self.workdir / "passwd"
            pw.write_text("")
            for user, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True,
                               capture_output=True)
            pw.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> Mosquitto:
        if self.proc and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not port_open("127.0.0.1", self.port):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited: {err} {self.log.read_text() if self.log.exists() else ''}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not open port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"
