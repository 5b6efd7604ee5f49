"""Fixtures of the edge suites (Python 3.8 compatible)."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def gst() -> str:
    """gst-launch-1.0's path. `make test` installs GStreamer, so a missing one is a failure, not a skip."""
    exe = shutil.which("gst-launch-1.0")
    if exe is None:
        pytest.fail("gst-launch-1.0 is not installed: apt-get install gstreamer1.0-tools "
                    "gstreamer1.0-plugins-base gstreamer1.0-plugins-good (make test does this as root)")
    return exe
