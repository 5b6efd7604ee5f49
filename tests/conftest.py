"""Fixtures shared by every suite: a real Mosquitto, real TFLite models, temp dirs.

Python 3.8 compatible: the device run (make test-py38) loads this file too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.helpers.broker import Mosquitto
from tests.helpers.models import build_all, default_dir


def pytest_configure(config):  # noqa: ANN001
    config.addinivalue_line("markers", "needs_tf: needs TensorFlow (skipped on the Python 3.8 device run)")


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Directory of real .tflite test models (see tests/helpers/models.py)."""
    d = default_dir()
    if not (d / "stamp.json").exists():
        if importlib.util.find_spec("tensorflow") is None:
            pytest.fail(f"no test models in {d} and no TensorFlow here: run `make test-models` first")
        build_all(d)
    return d


@pytest.fixture(scope="session")
def broker(tmp_path_factory):  # noqa: ANN001
    """One Mosquitto for the session (do not stop it in a test; use broker_factory for that)."""
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield b
    b.stop()


@pytest.fixture
def broker_factory(tmp_path):  # noqa: ANN001
    """Make private brokers a test may stop and restart: ``broker_factory(users={...})``."""
    made = []

    def make(**kw):  # noqa: ANN003
        b = Mosquitto(tmp_path / f"mosq{len(made)}", **kw)
        made.append(b)
        return b.start()

    yield make
    for b in made:
        b.stop()
