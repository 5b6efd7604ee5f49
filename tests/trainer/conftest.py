"""Trainer fixtures: a tiny digits data set and one trained + optimized + evaluated run shared by the
stage tests (the expensive part runs once per session)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

if importlib.util.find_spec("tensorflow") is None:  # the Python 3.8 device run has no TensorFlow
    collect_ignore_glob = ["test_*.py"]
else:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Small but learnable: 4 digits x 60 images at 32x32, 2 folds, few epochs.
CLASSES = 4
PER_CLASS = 60
TINY = {"train.folds": 2, "train.epochs": 8, "train.cv_epochs": 3, "train.flip": False,
        "optimize.prune_epochs": 3, "optimize.representative_samples": 50, "model.input_size": 32,
        "gate.max_accuracy_drop": 10.0}


def tiny_config(**extra):  # noqa: ANN003, ANN201
    from trainer.config import Config, apply_overrides

    return apply_overrides(Config(), {**TINY, **extra})


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:  # noqa: ANN001
    from trainer.datasets import write_digits

    return write_digits(tmp_path_factory.mktemp("digits") / "data", per_class=PER_CLASS, classes=CLASSES)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, digits_dir) -> Path:  # noqa: ANN001
    """A run dir after ingest, train, optimize, evaluate and report (session-wide; do not modify)."""
    from trainer import pipeline

    rundir = tmp_path_factory.mktemp("run") / "r"
    pipeline.ingest(rundir, [str(digits_dir)], tiny_config())
    pipeline.train(rundir)
    pipeline.optimize(rundir)
    pipeline.evaluate(rundir)
    pipeline.report(rundir)
    return rundir


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:  # noqa: ANN001
    """A private copy of the trained run a test may change."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst
