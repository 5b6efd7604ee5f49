"""The factory model: ``[model] path`` as a bare, unsigned ``.tflite``. The daemon starts on it when no
signed model is installed (and ``[update] allow_unsigned_factory`` allows it), the updater rolls a
failed first trial back to it, and ``--check-config`` loads it once to prove it runs."""

from __future__ import annotations

from pathlib import Path

from edge.config import ModelConfig
from edge.inference.runtime import Model, load_labels, load_model


def is_bundle_path(path: str) -> bool:
    return path.endswith(".kbundle")


def load_factory_model(m: ModelConfig) -> Model:
    """Load ``m.path``, a bare .tflite (the callers check that it is set and not a bundle; bundles are
    installed through the updater)."""
    labels = load_labels(m.labels) if m.labels else None
    return load_model(m.path, labels=labels, runtime=m.runtime, threads=m.resolved_threads, name=Path(m.path).stem,
                      color_order=m.color_order, normalization=m.normalization, resize=m.resize)
