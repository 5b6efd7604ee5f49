"""The model the daemon starts on, and how its swaps are followed.

What ``kestrel-edge run`` does before its pipeline starts: take the updater's boot model (the
active slot), else install a ``model.path`` bundle through the updater, else run the unsigned
factory ``.tflite`` when ``[update] allow_unsigned_factory`` allows it, else wait for the hub to
deploy a first model (when it can). Also the helpers around it: reading a model's bundle
``default_threshold``, and the ModelHolder that tells the daemon about every swap (``FollowingHolder``).
The factory model itself is loaded by edge.updater.factory.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from edge import config
from edge.pipeline.loop import ModelHolder
from edge.updater.factory import is_bundle_path, load_factory_model
from proto.errors import ArtifactError, ConfigError, KestrelError

log = logging.getLogger("edge.daemon")  # the boot is part of the daemon's log


def model_default_threshold(model: Any, slots: Any) -> Optional[float]:
    """The ``default_threshold`` of the bundle ``model`` came from (None for a bare .tflite).

    Read from ``model.default_threshold`` when the loader set it, else from the record of the slot
    holding exactly this model (same name, version and model sha256).
    """
    value = getattr(model, "default_threshold", None)
    if value is None and slots is not None:
        ref = model.ref
        for name in ("a", "b"):
            slot = slots.slot(name)
            if (slot is not None and slot.model_sha256 == ref.sha256 and slot.model_name == ref.name
                    and slot.version == int(ref.version)):
                value = slot.record.get("default_threshold")
                break
    return None if value is None else float(value)


class FollowingHolder(ModelHolder):
    """A ModelHolder that calls ``on_swap(model)`` after every swap (boot, update, rollback)."""

    def __init__(self, on_swap: Callable[[Any], None]) -> None:
        super().__init__()
        self._on_swap = on_swap

    def swap(self, model: Any) -> Any:
        previous = super().swap(model)
        if model is not None:
            try:
                self._on_swap(model)
            except Exception:  # a swap must never fail half-way because of a listener
                log.exception("model swap listener failed")
        return previous


def install_configured_bundle(cfg: config.EdgeConfig, updater: Any, holder: ModelHolder, path: str) -> Any:
    """No slot yet and model.path is a .kbundle: verify, stage, self-test and switch to it
    through the updater's normal install path; the result is committed at once (there is no
    previous model to roll back to). ConfigError (one line, exit 2) when it is refused.
    ``updater`` is the daemon's edge.updater.service.UpdateService."""
    from proto.bundle import read_bounded

    try:
        data = read_bounded(path, int(cfg.update.max_bundle_bytes))  # size checked first
        installed = updater.install_bytes(data, source=f"model.path {Path(path).name}")
    except ArtifactError as exc:
        raise ConfigError(f"model.path {path}: {exc} (trusted keys: {cfg.trust_dir})") from exc
    except KestrelError as exc:
        raise ConfigError(f"model.path {path}: could not install it: {exc}") from exc
    model = holder.get()
    if not installed or model is None:
        raise ConfigError(f"model.path {path}: the bundle was not installed; "
                          "check `kestrel-edge status`")
    from edge.updater import state as st

    if updater.updater.state.state == st.TRIAL:
        updater.updater.commit("first model, installed from model.path (nothing to roll back to)")
        updater.health.end_trial()
    log.info("installed %s v%d from model.path %s into slot %s", model.ref.name, model.ref.version, path,
             updater.updater.slots.active_name())
    return model


def boot(cfg: config.EdgeConfig, updater: Any, holder: ModelHolder) -> Any:
    """The model to start on, swapped into ``holder``; None: no model yet, the hub will deploy the
    first one. ConfigError when there is none and none can come. ``updater``: the UpdateService."""
    path = cfg.model.path
    model = updater.boot_model()
    if model is not None:
        if path and is_bundle_path(path):
            log.info("model.path %s ignored: a model is installed (update it with `kestrel-edge install`)",
                     path)
    elif not path:
        if not can_wait_for_hub(cfg):
            raise ConfigError("no model: nothing is installed in data_dir, model.path is empty and no hub "
                              "can deploy one ([mqtt] host and [update] hub_grpc unset, or [update] "
                              "enabled = false); set model.path or run `kestrel-edge install BUNDLE`")
        log.info("no model installed yet: waiting for the hub to deploy one (kestrel-hub deploy NAME "
                 "VERSION --group %s) or for `kestrel-edge install BUNDLE`", cfg.device.group)
        return None
    elif is_bundle_path(path):
        return install_configured_bundle(cfg, updater, holder, path)
    elif not cfg.update.allow_unsigned_factory:
        raise ConfigError(f"no signed model is installed and model.path {path} is an unsigned .tflite, "
                          "which [update] allow_unsigned_factory = false forbids; install a signed bundle "
                          "(kestrel-edge install, or model.path = a .kbundle)")
    else:
        log.warning("no signed model installed: running the UNSIGNED factory model %s (model.path; see "
                    "docs/threat-model.md)", path)
        model = load_factory_model(cfg.model)
    holder.swap(model)
    return model


def can_wait_for_hub(cfg: config.EdgeConfig) -> bool:
    """A device with no model may wait for its first one when the hub can deploy to it."""
    return bool(cfg.update.enabled and cfg.update.hub_grpc and cfg.mqtt.host)


def wait_for_first_model(holder: ModelHolder, stop_requested: threading.Event, poll_s: float) -> Any:
    """Block until the updater installed a first model (hot swap into the holder) or a stop request."""
    while not stop_requested.is_set():
        model = holder.get()
        if model is not None:
            return model
        stop_requested.wait(poll_s)
    return None
