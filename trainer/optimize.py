"""Optimization: magnitude pruning (tfmot, PolynomialDecay schedule) -> strip_pruning -> optional
pruning-preserving QAT -> full-integer post-training quantization (TFLITE_BUILTINS_INT8, uint8/int8 I/O,
representative data set = training images through the device preprocessing)."""

from __future__ import annotations

import gzip
from typing import Any, Callable, Dict, Iterable, Optional

import numpy as np

from trainer.config import Config
from trainer.models import compile_model
from trainer.preprocess import normalize
from trainer.tfenv import tf, tfmot
from trainer.train import make_dataset

# Tiny data sets give few steps per epoch; pruning that ramps in a handful of steps leaves no time to
# recover, so the fine-tune runs at least this many steps (more epochs when needed).
MIN_PRUNE_STEPS = 30

SCHEDULE_TEXT = (
    "Magnitude pruning with a PolynomialDecay schedule: every `frequency` steps the smallest-magnitude "
    "weights of each prunable layer (convolutions, dense) are masked to zero. Sparsity starts at "
    "initial_sparsity and rises along s(t) = final + (initial - final) * (1 - t/T)^3 to the target at step T "
    "(2/3 of the pruning fine-tune), then holds while the remaining weights recover. strip_pruning then "
    "removes the masks, leaving ordinary layers whose zeros compress well (gzip) - the int8 conversion keeps "
    "the zeros.")


def prune(model: Any, images: np.ndarray, labels: np.ndarray, cfg: Config) -> tuple:
    """Fine-tune with pruning to cfg.optimize.sparsity; returns (stripped model, schedule dict, history)."""
    t, mot = tf(), tfmot()
    oc = cfg.optimize
    steps_per_epoch = int(np.ceil(len(images) / cfg.train.batch_size))
    epochs = max(oc.prune_epochs, int(np.ceil(MIN_PRUNE_STEPS / steps_per_epoch)))
    total = max(1, steps_per_epoch * epochs)
    end = max(1, int(total * 2 / 3))
    freq = max(1, min(100, end // 4 or 1))
    schedule = mot.sparsity.keras.PolynomialDecay(initial_sparsity=oc.initial_sparsity,
                                                  final_sparsity=oc.sparsity, begin_step=0, end_step=end,
                                                  frequency=freq)
    pruned = mot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    compile_model(pruned, cfg.train.learning_rate * 0.5)
    hist = pruned.fit(make_dataset(images, labels, cfg, training=True, seed=cfg.data.seed + 100),
                      epochs=epochs, verbose=0,
                      callbacks=[mot.sparsity.keras.UpdatePruningStep()])
    stripped = mot.sparsity.keras.strip_pruning(pruned)
    del t
    info = {"initial_sparsity": oc.initial_sparsity, "final_sparsity": oc.sparsity, "begin_step": 0,
            "end_step": end, "frequency": freq, "total_steps": total, "epochs": epochs, "power": 3,
            "explained": SCHEDULE_TEXT}
    return stripped, info, {k: [float(v) for v in vals] for k, vals in hist.history.items()}


def prune_preserving_qat(model: Any, images: np.ndarray, labels: np.ndarray, cfg: Config) -> Any:
    """tfmot pruning-preserving quantization-aware training (Default8BitPrunePreserveQuantizeScheme)."""
    mot = tfmot()
    annotated = mot.quantization.keras.quantize_annotate_model(model)
    from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.prune_preserve import (
        default_8bit_prune_preserve_quantize_scheme as pp,
    )

    qat = mot.quantization.keras.quantize_apply(annotated, pp.Default8BitPrunePreserveQuantizeScheme())
    compile_model(qat, cfg.train.learning_rate * 0.2)
    qat.fit(make_dataset(images, labels, cfg, training=True, seed=cfg.data.seed + 200),
            epochs=cfg.optimize.qat_epochs, verbose=0)
    return qat


def sparsity_of(model: Any) -> Dict[str, float]:
    """Share of exact zeros in the kernels of prunable layers (conv, depthwise, dense)."""
    keras = tf().keras
    zeros = total = 0
    per_layer: Dict[str, float] = {}
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense, keras.layers.DepthwiseConv2D)):
            w = layer.get_weights()[0]
            z = int((w == 0).sum())
            per_layer[layer.name] = z / w.size
            zeros += z
            total += w.size
    return {"overall": zeros / max(1, total), **{f"layer:{k}": v for k, v in per_layer.items()}}


def representative(images: np.ndarray, cfg: Config, n: int) -> Callable[[], Iterable[list]]:
    rng = np.random.default_rng(cfg.data.seed)
    idx = rng.permutation(len(images))[:n]
    real = normalize(images[idx], cfg.model.normalization)

    def gen() -> Iterable[list]:
        for x in real:
            yield [x[None].astype(np.float32)]

    return gen


def to_tflite(model: Any, rep: Optional[Callable[[], Iterable[list]]] = None, io_dtype: str = "uint8") -> bytes:
    """Float .tflite when rep is None, else full-integer int8 with io_dtype input/output."""
    t = tf()
    conv = t.lite.TFLiteConverter.from_keras_model(model)
    if rep is not None:
        conv.optimizations = [t.lite.Optimize.DEFAULT]
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS_INT8]
        dt = t.uint8 if io_dtype == "uint8" else t.int8
        conv.inference_input_type = dt
        conv.inference_output_type = dt
    return bytes(conv.convert())


def gzip_size(data: bytes) -> int:
    return len(gzip.compress(data, compresslevel=9))


def tensor_types(tflite: bytes) -> Dict[str, int]:
    """Count tensors per dtype in a .tflite (for checking a model is really int8)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=tflite)
    counts: Dict[str, int] = {}
    for d in interp.get_tensor_details():
        name = np.dtype(d["dtype"]).name
        counts[name] = counts.get(name, 0) + 1
    return counts
