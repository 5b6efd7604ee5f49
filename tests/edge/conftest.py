"""Fixtures of the edge suites (Python 3.8 compatible)."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any, Callable, Iterator, List

import pytest

from tests.helpers.bundles import KeyPair, make_keypair

if TYPE_CHECKING:
    from tests.helpers.rtsp import RtspCamera


def publisher_for(cfg: Any, device_id: str, spool_dir: Any) -> Any:
    """A Publisher built from an EdgeConfig's sections, as the daemon builds it."""
    from edge.uplink.publisher import Publisher

    return Publisher(cfg.mqtt, cfg.spool, device_id, cfg.device.group, spool_dir)


@pytest.fixture(scope="session")
def gst() -> str:
    """gst-launch-1.0's path. `make test` installs GStreamer, so a missing one is a failure, not a skip."""
    exe = shutil.which("gst-launch-1.0")
    if exe is None:
        pytest.fail("gst-launch-1.0 is not installed: apt-get install gstreamer1.0-tools "
                    "gstreamer1.0-plugins-base gstreamer1.0-plugins-good (make test does this as root)")
    return exe


@pytest.fixture
def kp(tmp_path) -> KeyPair:  # noqa: ANN001
    """A fresh Ed25519 signing key pair (the trainer's) with its public half as the device's trust."""
    return make_keypair(tmp_path)


@pytest.fixture
def device(tmp_path, kp: KeyPair) -> Iterator[Callable[..., Any]]:  # noqa: ANN001
    """``device(**update_config)`` -> a test_updater.Device (real updater, real interpreters), closed after."""
    from tests.edge.test_updater import Device, make_cfg

    devs: List[Any] = []

    def make(**update: Any) -> Device:
        d = Device(make_cfg(tmp_path, kp.pub_path, **update))
        devs.append(d)
        return d

    yield make
    for d in devs:
        d.close()


@pytest.fixture
def camera() -> Iterator[RtspCamera]:
    """A real RTSP camera (tests/helpers/rtsp_server.py) serving the test pattern; stopped after the test."""
    from tests.helpers.rtsp import RtspCamera, rtsp_server_missing

    missing = rtsp_server_missing()
    if missing:  # make test installs it (Makefile APT_PKGS): a missing server is a broken setup
        pytest.fail(missing)
    cam = RtspCamera().start()
    try:
        yield cam
    finally:
        cam.stop()
