"""Trainer fixtures: a tiny digits data set and ONE whole pipeline run through `kestrel-train run`
(progress bars on, packaging on), shared by the stage and end-to-end tests: the expensive part runs once
per session. Tests that change a run work on a private copy (`run_copy`)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import types
from pathlib import Path

import pytest

from demo.__main__ import CLASSES as DEMO_CLASSES
from demo.__main__ import DATA_SEED, TRAIN_PER_CLASS
from demo.__main__ import TEST_FRACTION as DEMO_TEST_FRACTION

if importlib.util.find_spec("tensorflow") is None:  # the Python 3.8 device run has no TensorFlow
    collect_ignore_glob = ["test_*.py"]
else:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[2]
VENV38 = REPO / ".venv38"
PY38 = VENV38 / "bin" / "python"

# The tflite-runtime a Jetson Nano gets (jetson/constraints-jp46.txt pins the device suite to it).
DEVICE_TFLITE_RUNTIME = re.search(r"^tflite-runtime==([\d.]+)", (REPO / "jetson" / "constraints-jp46.txt").read_text(),
                                  re.M).group(1)  # type: ignore[union-attr]


# The demo's data (demo/__main__.py): 30 of each digit 0-9, a seeded random choice (so the demo's camera, the
# other digits, shows the same kind of images), at 32x32; 2 folds, few epochs. 30 % held out (90 images, the
# demo's split too): the sampling-threshold sweep needs the int8 model's held-out errors (typically 4-10 here).
CLASSES = DEMO_CLASSES
PER_CLASS = TRAIN_PER_CLASS
TEST_FRACTION = DEMO_TEST_FRACTION
TINY = {"train.folds": 2, "train.epochs": 8, "train.cv_epochs": 5, "train.flip": False,
        "optimize.prune_epochs": 3, "optimize.representative_samples": 50, "model.input_size": 32,
        "gate.max_accuracy_drop": 10.0, "data.test_fraction": TEST_FRACTION}
# The same settings as the TOML file the shared run uses (exercises --config).
TINY_TOML = f"""
[data]
test_fraction = {TEST_FRACTION}
[model]
input_size = 32
[train]
folds = 2
epochs = 8
cv_epochs = 5
flip = false
[optimize]
prune_epochs = 3
representative_samples = 50
[gate]
max_accuracy_drop = 10.0
"""
BUNDLE_VERSION = 2


def tiny_config(**extra):  # noqa: ANN003, ANN201
    from trainer.config import Config, apply_overrides

    return apply_overrides(Config(), {**TINY, **extra})


def need_py38(venv: Path = VENV38) -> bool:
    """Device-runtime tests run when the Python 3.8 venv is complete (`make` touches its .stamp after the
    last install: a bare bin/python may lack tflite-runtime), and must run when KESTREL_REQUIRE_PY38=1."""
    stamp = venv / ".stamp"
    if stamp.exists():
        return True
    if os.environ.get("KESTREL_REQUIRE_PY38") == "1":
        pytest.fail(f"KESTREL_REQUIRE_PY38=1 but {stamp} is absent: create the device venv with `make .venv38/.stamp`")
    pytest.skip(f"{stamp} is absent: create the device venv with `make .venv38/.stamp` to test Python 3.8")
    return False  # pragma: no cover


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:  # noqa: ANN001
    from trainer.datasets import write_digits

    return write_digits(tmp_path_factory.mktemp("digits") / "data", per_class=PER_CLASS, classes=CLASSES,
                        seed=DATA_SEED)


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory, digits_dir) -> types.SimpleNamespace:  # noqa: ANN001
    """`kestrel-train run ... --key K --version 2 --bundle B` once, with progress bars (session-wide; the
    run dir must not be modified: use run_copy)."""
    from proto.keys import generate_keypair
    from trainer.cli import main

    tmp = tmp_path_factory.mktemp("e2e")
    key, pub = generate_keypair(tmp / "keys")
    rundir = tmp / "runs" / "r1"
    bundle = tmp / "model.kbundle"
    (tmp / "tiny.toml").write_text(TINY_TOML)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["run", "--data", str(digits_dir), "--out", str(rundir), "--config", str(tmp / "tiny.toml"),
                   "--key", str(key), "--version", str(BUNDLE_VERSION), "--bundle", str(bundle)])
    assert rc == 0, f"kestrel-train run failed:\n{err.getvalue()[-3000:]}"
    return types.SimpleNamespace(tmp=tmp, key=key, pub=pub, rundir=rundir, bundle=bundle,
                                 stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="session")
def trained_run(cli_run) -> Path:  # noqa: ANN001
    """The shared run dir after ingest, train, optimize, evaluate, report and package (do not modify)."""
    return Path(cli_run.rundir)


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:  # noqa: ANN001
    """A private copy of the trained run a test may change."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst
