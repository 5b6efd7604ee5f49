"""Optimization: magnitude pruning (tfmot, PolynomialDecay schedule) -> strip_pruning -> optional
pruning-preserving QAT -> full-integer post-training quantization (TFLITE_BUILTINS_INT8, uint8/int8 I/O,
representative data set = training images through the device preprocessing).

Only the kernels of Conv2D and Dense layers are pruned (tfmot leaves DepthwiseConv2D dense): the model is
cloned with just those layers wrapped, so architectures with layers tfmot cannot wrap (MobileNetV3's
hard-swish TFOpLambda and Multiply layers) prune too. The converter settings that decide whether a bundle runs on
the oldest device runtime (tflite-runtime 2.14) are pinned in ``CONVERTER_PINS``, not left to the
TensorFlow version's defaults; tests/trainer/test_models.py runs every architecture x io dtype (x QAT)
on tflite-runtime 2.14 under Python 3.8.
"""

from __future__ import annotations

import gzip
from typing import Any, Callable, Dict, Iterable, Optional

import numpy as np

from trainer.config import Config
from trainer.errors import OptimizeError
from trainer.models import compile_model
from trainer.preprocess import normalize
from trainer.tfenv import configure, tf, tfmot
from trainer.train import make_dataset

# Tiny data sets give few steps per epoch; pruning that ramps in a handful of steps leaves no time to
# recover, so the fine-tune runs at least this many steps (more epochs when needed).
MIN_PRUNE_STEPS = 30

SCHEDULE_TEXT = (
    "Magnitude pruning with a PolynomialDecay schedule: every `frequency` steps the smallest-magnitude "
    "weights of each prunable layer (convolutions except depthwise, dense) are masked to zero. Sparsity starts at "
    "initial_sparsity and rises along s(t) = final + (initial - final) * (1 - t/T)^3 to the target at step T "
    "(2/3 of the pruning fine-tune), then holds while the remaining weights recover. strip_pruning then "
    "removes the masks, leaving ordinary layers whose zeros compress well (gzip) - the int8 conversion keeps "
    "the zeros.")


def is_prunable(layer: Any) -> bool:
    """Conv2D and Dense kernels. DepthwiseConv2D (a Conv2D subclass) is left out: tfmot's registry lists
    no prunable weight for it (its 3x3 per-channel kernels are a few % of a MobileNet's weights and
    sensitive), so wrapping it would only add overhead."""
    keras = tf().keras
    return (isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
            and not isinstance(layer, keras.layers.DepthwiseConv2D))


def wrap_for_pruning(model: Any, schedule: Any) -> Any:
    """A clone of `model` whose Conv2D and Dense layers are wrapped for magnitude pruning.

    The other layers (and the wrapped layers' weights) are the model's own objects: training the clone
    trains `model` in place; convert `model` first if its unpruned form is needed."""
    keras, mot = tf().keras, tfmot()

    def wrap(layer: Any) -> Any:
        if is_prunable(layer):
            return mot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer

    try:
        return keras.models.clone_model(model, clone_function=wrap)
    except (ValueError, TypeError, AttributeError) as exc:
        raise OptimizeError(f"cannot prepare {model.name} for pruning: {str(exc).splitlines()[0][:200]}; "
                            "set optimize.sparsity = 0 to skip pruning") from exc


def prune(model: Any, images: np.ndarray, labels: np.ndarray, cfg: Config) -> tuple:
    """Fine-tune with pruning to cfg.optimize.sparsity; returns (stripped model, schedule dict, history)."""
    configure(cfg.train.deterministic, seed=cfg.data.seed)
    mot = tfmot()
    oc = cfg.optimize
    steps_per_epoch = int(np.ceil(len(images) / cfg.train.batch_size))
    epochs = max(oc.prune_epochs, int(np.ceil(MIN_PRUNE_STEPS / steps_per_epoch)))
    total = max(1, steps_per_epoch * epochs)
    end = max(1, int(total * 2 / 3))
    freq = max(1, min(100, end // 4 or 1))
    end = freq * max(1, end // freq)    # the last mask update lands on end_step: the target is reached exactly
    schedule = mot.sparsity.keras.PolynomialDecay(initial_sparsity=oc.initial_sparsity,
                                                  final_sparsity=oc.sparsity, begin_step=0, end_step=end,
                                                  frequency=freq)
    pruned = wrap_for_pruning(model, schedule)
    compile_model(pruned, cfg.train.learning_rate * 0.5)
    hist = pruned.fit(make_dataset(images, labels, cfg, training=True, seed=cfg.data.seed + 100),
                      epochs=epochs, verbose=0,
                      callbacks=[mot.sparsity.keras.UpdatePruningStep()])
    stripped = mot.sparsity.keras.strip_pruning(pruned)
    info = {"initial_sparsity": oc.initial_sparsity, "final_sparsity": oc.sparsity, "begin_step": 0,
            "end_step": end, "frequency": freq, "total_steps": total, "epochs": epochs, "power": 3,
            "pruned_layer_types": ["Conv2D", "Dense"], "explained": SCHEDULE_TEXT}
    return stripped, info, {k: [float(v) for v in vals] for k, vals in hist.history.items()}


def prune_preserving_qat(model: Any, images: np.ndarray, labels: np.ndarray, cfg: Config) -> Any:
    """tfmot pruning-preserving quantization-aware training (Default8BitPrunePreserveQuantizeScheme)."""
    configure(cfg.train.deterministic, seed=cfg.data.seed)
    mot = tfmot()
    annotated = mot.quantization.keras.quantize_annotate_model(model)
    from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.prune_preserve import (
        default_8bit_prune_preserve_quantize_scheme as pp,
    )

    try:
        qat = mot.quantization.keras.quantize_apply(annotated, pp.Default8BitPrunePreserveQuantizeScheme())
    except (ValueError, TypeError, AttributeError, RuntimeError) as exc:
        raise OptimizeError(f"pruning-preserving QAT cannot handle {model.name}: "
                            f"{str(exc).strip().splitlines()[0][:200]}; set optimize.qat = false") from exc
    compile_model(qat, cfg.train.learning_rate * 0.2)
    qat.fit(make_dataset(images, labels, cfg, training=True, seed=cfg.data.seed + 200),
            epochs=cfg.optimize.qat_epochs, verbose=0)
    return qat


def sparsity_of(model: Any) -> Dict[str, float]:
    """Share of exact zeros: `overall` over the pruned kernels (Conv2D, Dense), `all_kernels` also counting
    the (unpruned) depthwise kernels, and per layer."""
    keras = tf().keras
    zeros = total = all_zeros = all_total = 0
    per_layer: Dict[str, float] = {}
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            w = layer.get_weights()[0]
            z = int((w == 0).sum())
            per_layer[layer.name] = z / w.size
            all_zeros += z
            all_total += w.size
            if is_prunable(layer):
                zeros += z
                total += w.size
    return {"overall": zeros / max(1, total), "all_kernels": all_zeros / max(1, all_total),
            **{f"layer:{k}": v for k, v in per_layer.items()}}


def representative(images: np.ndarray, cfg: Config, n: int) -> Callable[[], Iterable[list]]:
    rng = np.random.default_rng(cfg.data.seed)
    idx = rng.permutation(len(images))[:n]
    real = normalize(images[idx], cfg.model.normalization)

    def gen() -> Iterable[list]:
        for x in real:
            yield [x[None].astype(np.float32)]

    return gen


# Converter settings pinned (not left to TensorFlow's defaults, which move between versions): the MLIR
# converter and quantizer; builtin ops only (no Select TF ops, no custom ops: tflite-runtime has neither);
# per-channel int8 weights (unless optimize.per_channel = false) with int32 biases;
# no buffer-offset flatbuffers (a >2 GB format older runtimes cannot read); no StableHLO quantizer.
CONVERTER_PINS: Dict[str, Any] = {
    "experimental_new_converter": True,
    "experimental_new_quantizer": True,
    "allow_custom_ops": False,
    "experimental_use_stablehlo_quantizer": False,
    "_experimental_full_integer_quantization_bias_type": None,
    "_experimental_use_buffer_offset": False,
    "_experimental_strict_qdq": False,
}


def converter_settings() -> Dict[str, Any]:
    """What optimize.json records about the converter (TF version + the pins)."""
    return {"tensorflow": str(tf().__version__), **{k.lstrip("_"): v for k, v in CONVERTER_PINS.items()}}


def to_tflite(model: Any, rep: Optional[Callable[[], Iterable[list]]] = None, io_dtype: str = "uint8",
              per_channel: bool = True) -> bytes:
    """Float .tflite when rep is None, else full-integer int8 with io_dtype input/output (per-channel or
    per-tensor weight scales)."""
    t = tf()
    conv = t.lite.TFLiteConverter.from_keras_model(model)
    pins = dict(CONVERTER_PINS, _experimental_disable_per_channel=not per_channel)
    for key, value in pins.items():
        if not hasattr(conv, key):  # pragma: no cover - a TensorFlow without this knob: say so, do not guess
            raise OptimizeError(f"this TensorFlow ({t.__version__}) has no converter setting {key}: "
                                "check trainer.optimize.CONVERTER_PINS against it")
        setattr(conv, key, value)
    if rep is not None:
        conv.optimizations = [t.lite.Optimize.DEFAULT]
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS_INT8]
        dt = t.uint8 if io_dtype == "uint8" else t.int8
        conv.inference_input_type = dt
        conv.inference_output_type = dt
    else:
        conv.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS]
    try:
        return bytes(conv.convert())
    except Exception as exc:  # noqa: BLE001 - the converter raises ConverterError, ValueError, RuntimeError ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OptimizeError(f"TFLite conversion of {getattr(model, 'name', 'the model')} failed: "
                            f"{first[:300]}") from exc


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
