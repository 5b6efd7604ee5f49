"""``kestrel-edge run --check-config``: the checks a config must pass before the daemon starts.

Loading the file (``load_config``), the plausibility checks run at every start (``check_plausible``:
the source, the model and labels files, data_dir, the MQTT credential and TLS files), loading the
configured .tflite once as the daemon would (``check_model_loads``, for ``--check-config``), and
``quiet_opencv``, which keeps OpenCV's own warnings out of the daemon's log.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import List, Optional

import cv2

from edge import config
from edge.credentials import credential_path, read_secret, secret_file
from edge.sources.gstreamer import preset_problems
from edge.updater.factory import is_bundle_path, load_factory_model
from proto.errors import ConfigError, KestrelError


def check_plausible(cfg: config.EdgeConfig) -> List[str]:
    """Problems that make the config unusable on this machine (empty = fine)."""
    problems: List[str] = []
    for i, src in enumerate(cfg.camera_sources):
        problems.extend(source_problems(src, f"sources[{i}] ({src.name})" if cfg.sources else "source"))
    m = cfg.model
    if m.path:
        p = Path(m.path)
        if not p.is_file():
            problems.append(f"model.path: {m.path} does not exist")
        elif p.suffix not in (".tflite", ".kbundle"):
            problems.append(f"model.path: {m.path} is neither a .tflite file nor a .kbundle bundle")
    if m.labels and not Path(m.labels).is_file():
        problems.append(f"model.labels: {m.labels} does not exist")
    problem = _data_dir_problem(cfg.data_dir)
    if problem:
        problems.append(problem)
    q = cfg.mqtt
    if q.host:
        files = [("password_file", q.password_file)]
        if q.tls:
            files += [("ca_file", q.ca_file), ("cert_file", q.cert_file), ("key_file", q.key_file)]
        for key, path in files:
            if path and not _readable(path):
                problems.append(f"mqtt.{key}: {credential_path(path)} does not exist or is not readable")
            elif path and key in ("password_file", "key_file"):
                try:
                    secret_file(path)
                except ConfigError as exc:
                    problems.append(f"mqtt.{key}: {exc}")
        if (q.ca_file or q.cert_file or q.key_file) and not q.tls:
            problems.append("mqtt: ca_file/cert_file/key_file are set but tls = false")
    for path in cfg.update.fleet_keys:
        if not Path(credential_path(path)).exists():
            problems.append(f"update.fleet_keys: {credential_path(path)} does not exist")
    u = cfg.update
    if u.enabled and u.hub_grpc:
        if u.ca_file and not _readable(u.ca_file):
            problems.append(f"update.ca_file: {credential_path(u.ca_file)} does not exist or is not readable")
        if u.token_file:
            try:
                read_secret(u.token_file)
            except ConfigError as exc:
                problems.append(f"update.token_file: {exc}")
    return problems


def source_problems(src: config.SourceConfig, key: str) -> List[str]:
    """What makes one camera's config unusable here; ``key`` names it in the messages."""
    problems: List[str] = []
    if src.kind == "file" and not Path(src.uri).is_file():
        problems.append(f"{key}.uri: video file {src.uri} does not exist")
    if src.kind == "gstreamer" and not shutil.which("gst-launch-1.0"):
        problems.append(f"{key}.kind = gstreamer needs gst-launch-1.0 (apt install gstreamer1.0-tools)")
    elif src.kind == "gstreamer" and src.preset:
        problems.extend(p.replace("source.", f"{key}.", 1) for p in preset_problems(src))
    if src.kind == "rtsp" and not src.uri.lower().startswith(("rtsp://", "rtsps://")):
        problems.append(f"{key}.uri: {src.uri!r} is not an rtsp:// URL")
    if src.kind == "v4l2" and not src.uri.isdigit() and not src.uri.startswith("/dev/"):
        problems.append(f"{key}.uri: {src.uri!r} is neither a camera index nor a /dev/videoN path")
    return problems


def _readable(path: str) -> bool:
    path = credential_path(path)
    return Path(path).is_file() and os.access(path, os.R_OK)


def _data_dir_problem(data_dir: Path) -> Optional[str]:
    """None when ``data_dir`` exists (or can be created) and is a writable directory."""
    d = data_dir
    while not d.exists() and d != d.parent:
        d = d.parent  # the first existing ancestor decides whether it can be created
    if not d.is_dir():
        return f"device.data_dir: {data_dir}: {d} is not a directory"
    if not os.access(str(d), os.W_OK | os.X_OK):
        what = "is not writable" if d == data_dir else f"cannot be created ({d} is not writable)"
        return f"device.data_dir: {data_dir} {what}; run as a user who may write there or change it"
    return None


def check_model_loads(cfg: config.EdgeConfig) -> List[str]:
    """--check-config: load the configured .tflite (and labels) once, as the daemon would."""
    m = cfg.model
    if not m.path or is_bundle_path(m.path) or not Path(m.path).is_file():
        return []  # bundles are verified by the updater at start; a missing path is reported already
    try:
        load_factory_model(cfg.model).close()
    except KestrelError as exc:
        return [f"model.path: {exc}"]
    return []


def quiet_opencv(quiet: bool = True) -> None:
    """OpenCV logs a warning per failed open; our sources log one line per kind of failure instead."""
    try:
        lg = cv2.utils.logging  # type: ignore[attr-defined]
        lg.setLogLevel(lg.LOG_LEVEL_ERROR if quiet else lg.LOG_LEVEL_INFO)
    except AttributeError:  # pragma: no cover - builds without cv2.utils.logging
        pass


def load_config(path: str) -> config.EdgeConfig:
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist (pass --config PATH)")
    return config.load(path)
