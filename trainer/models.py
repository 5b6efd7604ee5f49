"""Networks: a small CNN (tiny data, tests, demo) and Keras MobileNetV2 / MobileNetV3 Small / Large (transfer
learning from a local ImageNet weights file, or from scratch).

Every model is flat (the backbone's layers sit directly in the model, tfmot cannot prune nested models)
and ends in the same head: ``dropout`` -> ``scores`` (Dense softmax). Transfer learning first trains
the head on the frozen backbone (``freeze_backbone``), then fine-tunes with the BatchNormalization
layers kept in inference mode (``unfreeze_for_fine_tuning``): small data sets would otherwise wreck the
ImageNet statistics in the first steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.config import ModelConfig
from trainer.errors import WeightsError
from trainer.tfenv import tf


def _backbone(cfg: ModelConfig, input_tensor: Any = None) -> Any:
    """The MobileNet without top, built on input_tensor so the final model stays flat (tfmot cannot
    prune nested models)."""
    keras = tf().keras
    shape = (cfg.input_size, cfg.input_size, cfg.channels)
    if cfg.arch == "mobilenet_v2":
        return keras.applications.MobileNetV2(input_shape=shape, alpha=cfg.alpha, include_top=False,
                                              weights=None, pooling="avg", input_tensor=input_tensor)
    if cfg.arch in ("mobilenet_v3_small", "mobilenet_v3_large"):
        # include_preprocessing=False: normalization is ours (InputSpec), not a layer inside the model.
        ctor = (keras.applications.MobileNetV3Small if cfg.arch == "mobilenet_v3_small"
                else keras.applications.MobileNetV3Large)
        return ctor(input_shape=shape, alpha=cfg.alpha, include_top=False, weights=None, pooling="avg",
                    minimalistic=False, include_preprocessing=False, input_tensor=input_tensor)
    raise ValueError(cfg.arch)  # pragma: no cover


def load_backbone_weights(backbone: Any, cfg: ModelConfig) -> None:
    path = Path(cfg.weights)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist: pass a Keras .h5 ImageNet weights file for "
                           f"{cfg.arch} alpha {cfg.alpha}, or leave --weights empty to train from scratch")
    try:
        backbone.load_weights(str(path))
    except Exception as exc:  # noqa: BLE001 - h5py/keras raise ValueError, OSError, KeyError ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"weights file {path} does not fit {cfg.arch} (alpha {cfg.alpha}, input {cfg.input_size}, "
            f"no top): {first[:200]}. Use the matching '..._no_top.h5' file or another --arch") from exc


def check_weights(cfg: ModelConfig) -> None:
    """Fail fast (before ingest/training) when the weights file is wrong (the config already refuses weights
    for small_cnn)."""
    if not cfg.weights:
        return
    load_backbone_weights(_backbone(cfg), cfg)
    tf().keras.backend.clear_session()


def build_model(cfg: ModelConfig, num_classes: int, seed: int = 0) -> Any:
    t = tf()
    keras = t.keras
    keras.utils.set_random_seed(seed)
    inp = keras.Input((cfg.input_size, cfg.input_size, cfg.channels), name="image")
    if cfg.arch == "small_cnn":
        x = inp
        w = cfg.width
        for i in range(3):
            x = keras.layers.Conv2D(w * 2 ** i, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
            x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
            x = keras.layers.ReLU(name=f"relu{i}")(x)
            x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
        x = keras.layers.Conv2D(w * 8, 3, padding="same", activation="relu", name="conv3")(x)
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    else:
        backbone = _backbone(cfg, inp)
        if cfg.weights:
            load_backbone_weights(backbone, cfg)
        x = backbone.output
    x = keras.layers.Dropout(0.2, name="dropout")(x)
    out = keras.layers.Dense(num_classes, activation="softmax", name="scores")(x)
    return keras.Model(inp, out, name=f"kestrel_{cfg.arch}")


HEAD_LAYERS = ("dropout", "scores")
# Tests set True: tiny MobileNets for one step skip the (much longer) graph tracing. Same layers, same math.
RUN_EAGERLY = False


def freeze_backbone(model: Any) -> None:
    """Transfer learning, phase 1: only the head trains (frozen BatchNormalization runs in inference mode)."""
    for layer in model.layers:
        layer.trainable = layer.name in HEAD_LAYERS


def unfreeze_for_fine_tuning(model: Any) -> None:
    """Phase 2: every layer trains except BatchNormalization, which keeps its ImageNet statistics."""
    keras = tf().keras
    for layer in model.layers:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)


def compile_model(model: Any, learning_rate: float) -> None:
    keras = tf().keras
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], run_eagerly=RUN_EAGERLY)
