"""The TFLite runtime: pick an interpreter package, load a model, check it fits, run it.

Runtimes, tried in this order by ``runtime="auto"``: ``tflite-runtime``
(``tflite_runtime.interpreter``), ``ai-edge-litert`` (``ai_edge_litert.interpreter``). ``tensorflow``
(``tf.lite``) is used only when configured explicitly, and imported lazily through importlib so
the daemon never pulls TensorFlow in by accident.

:func:`load_model` returns a :class:`Model`: ``infer(bgr)`` preprocesses a camera frame per the
model's :class:`~proto.inputspec.InputSpec`, invokes and returns dequantized float32 scores.
``infer_batch(frames)`` runs several frames through one invoke when the model's batch dimension is
dynamic (``shape_signature[0] == -1``, what converters write for Keras models): the input is resized to
the batch with ``resize_tensor_input`` (only when the batch size changes: each resize re-plans the
interpreter). A runtime that refuses the resize makes the model ``batchable = False`` (one WARNING), and
frames then go one by one.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from edge.errors import ModelError, RuntimeUnavailable
from edge.inference.preprocess import Preprocessor
from proto import kestrel_pb2
from proto.inputspec import InputSpec

RUNTIMES: Dict[str, str] = {
    "tflite-runtime": "tflite_runtime.interpreter",
    "ai-edge-litert": "ai_edge_litert.interpreter",
    "tensorflow": "tensorflow",
}
AUTO_ORDER = ("tflite-runtime", "ai-edge-litert")
log = logging.getLogger(__name__)


def interpreter_class(runtime: str = "auto") -> Tuple[str, Callable[..., Any]]:
    """Return (runtime name, Interpreter class) for ``runtime`` (auto, or one of RUNTIMES)."""
    if runtime != "auto" and runtime not in RUNTIMES:
        raise ModelError(f"unknown runtime {runtime!r}: use auto, {', '.join(RUNTIMES)}")
    names = AUTO_ORDER if runtime == "auto" else (runtime,)
    errors = []
    for name in names:
        try:
            mod = importlib.import_module(RUNTIMES[name])
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        if name == "tensorflow":
            return name, mod.lite.Interpreter  # type: ignore[no-any-return]
        return name, mod.Interpreter  # type: ignore[no-any-return]
    raise RuntimeUnavailable(
        "no TFLite runtime available (" + "; ".join(errors) + "): "
        "pip install tflite-runtime or ai-edge-litert"
    )


def _read(tflite: Union[str, Path, bytes]) -> bytes:
    if isinstance(tflite, (bytes, bytearray)):
        return bytes(tflite)
    p = Path(tflite)
    try:
        return p.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model file {p}: {exc.strerror or exc}") from exc


def _labels_from_file(path: Union[str, Path]) -> List[str]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ModelError(f"cannot read labels file {path}: {exc.strerror or exc}") from exc
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


class Model:
    """A loaded model. ``infer``/``invoke`` are serialized by a lock (interpreters are not thread-safe)."""

    def __init__(self, interpreter: Any, ref: Any, labels: List[str], spec: InputSpec,
                 runtime: str, threads: int = 0) -> None:
        self._interp = interpreter
        self.ref = ref
        self.labels = labels
        self.spec = spec
        self.runtime = runtime
        self.threads = threads  # the interpreter's num_threads (0: not known)
        self._lock = threading.Lock()
        inp = interpreter.get_input_details()[0]
        out = interpreter.get_output_details()[0]
        self._in_index = int(inp["index"])
        self._out_index = int(out["index"])
        self._in_dtype = np.dtype(inp["dtype"])
        q = out.get("quantization") or (0.0, 0)
        self._out_scale = float(q[0])
        self._out_zp = int(q[1])
        self._pre = Preprocessor(spec)
        sig = inp.get("shape_signature")
        self.batchable = sig is not None and len(sig) == 4 and int(sig[0]) == -1  # a dynamic batch dimension
        self._batch = 1  # the batch size the interpreter is allocated for
        self._closed = False
        self.default_threshold: Optional[float] = None  # the bundle's, set by the updater when loading a slot

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def preprocess(self, bgr: np.ndarray) -> np.ndarray:
        return self._pre(bgr)

    def invoke(self, x: np.ndarray) -> np.ndarray:
        """Run the model on an already preprocessed input tensor; float32 1-D scores."""
        if tuple(x.shape) != tuple(self.spec.shape) or x.dtype != self._in_dtype:
            raise ModelError(f"input tensor {x.dtype}{list(x.shape)} does not match the model's "
                             f"{self._in_dtype}{list(self.spec.shape)}")
        with self._lock:
            if self._closed:
                raise ModelError(f"model {self.ref.name} v{self.ref.version} is closed")
            return self._invoke_locked(x)

    @property
    def last_resized(self) -> Optional[np.ndarray]:
        """The last frame ``infer`` saw, resized to the model's input (uint8, before normalization).

        Valid until the next ``infer`` on this model; the sampler hashes it for near-duplicate
        suppression instead of the full camera frame (duplicates as the model sees them, and a
        fraction of the cost on camera-size frames)."""
        return getattr(self._pre, "last_resized", None)

    def infer(self, bgr: np.ndarray) -> np.ndarray:
        """Preprocess a BGR camera frame, invoke, return float32 scores."""
        with self._lock:  # the preprocessor's reused buffers are consumed by set_tensor under the same lock
            if self._closed:
                raise ModelError(f"model {self.ref.name} v{self.ref.version} is closed")
            x = self._pre.into(bgr)
            return self._invoke_locked(x)

    def infer_batch(self, frames: List[np.ndarray]) -> Tuple[List[np.ndarray], List[Optional[np.ndarray]]]:
        """Scores for each BGR frame, from one invoke when the model is ``batchable`` (else one invoke per
        frame), and each frame's model-size thumbnail (a copy of :attr:`last_resized`, for the sampler)."""
        with self._lock:
            if self._closed:
                raise ModelError(f"model {self.ref.name} v{self.ref.version} is closed")
            thumbs: List[Optional[np.ndarray]] = []
            if len(frames) > 1 and self.batchable and self._resize_locked(len(frames)):
                x = np.empty([len(frames)] + [int(d) for d in self.spec.shape[1:]], self._in_dtype)
                for i, bgr in enumerate(frames):
                    x[i] = self._pre.into(bgr)[0]
                    thumbs.append(self._thumbnail())
                raw = self._run_locked(x)
                return [self._dequantize(raw[i]) for i in range(len(frames))], thumbs
            scores = []
            for bgr in frames:
                x = self._pre.into(bgr)
                thumbs.append(self._thumbnail())
                scores.append(self._invoke_locked(x))
            return scores, thumbs

    def _thumbnail(self) -> Optional[np.ndarray]:
        resized = getattr(self._pre, "last_resized", None)
        return None if resized is None else resized.copy()

    def _resize_locked(self, n: int) -> bool:
        """Allocate the interpreter for a batch of ``n``; False (and no more batches) when the runtime refuses."""
        if n == self._batch:
            return True
        shape = [n] + [int(d) for d in self.spec.shape[1:]]
        try:
            self._interp.resize_tensor_input(self._in_index, shape)
            self._interp.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            self.batchable = False
            log.warning("model %s v%d cannot run a batch of %d frames (%s); running frames one by one",
                        self.ref.name, self.ref.version, n, str(exc).splitlines()[0] if str(exc) else exc)
            if n != 1:
                self._resize_locked(1)
            return False
        self._batch = n
        return True

    def _invoke_locked(self, x: np.ndarray) -> np.ndarray:
        if self._batch != 1:
            self._resize_locked(1)
        return self._dequantize(self._run_locked(x))

    def _run_locked(self, x: np.ndarray) -> np.ndarray:
        """set_tensor, invoke, the raw output (batch first)."""
        try:
            self._interp.set_tensor(self._in_index, x)
            self._interp.invoke()
            raw = self._interp.get_tensor(self._out_index)
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"inference failed: {exc}") from exc
        return raw  # type: ignore[no-any-return]

    def _dequantize(self, raw: np.ndarray) -> np.ndarray:
        raw = raw.reshape(-1)
        if self._out_scale > 0:
            return ((raw.astype(np.float32) - self._out_zp) * self._out_scale).astype(np.float32)
        return raw.astype(np.float32)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._interp = None


def _derive_spec(inp: Dict[str, Any], color_order: str, normalization: str, resize: str) -> InputSpec:
    dtype = np.dtype(inp["dtype"]).name
    scale, zp = inp.get("quantization") or (0.0, 0)
    if dtype != "float32" and not scale > 0:
        raise ModelError(f"the model's {dtype} input has no quantization scale; cannot feed camera frames")
    return InputSpec(shape=[int(s) for s in inp["shape"]], dtype=dtype,
                     scale=float(scale) if dtype != "float32" else 0.0,
                     zero_point=int(zp) if dtype != "float32" else 0,
                     color_order=color_order, normalization=normalization, resize=resize)


def load_model(tflite: Union[str, Path, bytes], *, labels: Optional[List[str]] = None,
               spec: Optional[InputSpec] = None, runtime: str = "auto", threads: int = 2, name: str = "",
               version: int = 0, color_order: str = "rgb", normalization: str = "0_1",
               resize: str = "stretch") -> Model:
    """Load and check a .tflite model (path or bytes). ModelError says what does not fit."""
    data = _read(tflite)
    what = str(tflite) if not isinstance(tflite, (bytes, bytearray)) else f"model ({len(data)} bytes)"
    if not name:
        name = Path(str(tflite)).stem if not isinstance(tflite, (bytes, bytearray)) else "model"
    rt_name, cls = interpreter_class(runtime)
    try:
        interp = cls(model_content=data, num_threads=int(threads))
        interp.allocate_tensors()
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelError(f"{what} is not a loadable TFLite model: {str(exc).splitlines()[0]}") from exc
    ins = interp.get_input_details()
    outs = interp.get_output_details()
    if len(ins) != 1:
        raise ModelError(f"{what} has {len(ins)} inputs; an image classifier needs exactly one "
                         "[1,H,W,3] input")
    if not outs:
        raise ModelError(f"{what} has no outputs")
    shape = [int(s) for s in ins[0]["shape"]]
    if len(shape) != 4 or shape[0] != 1 or shape[3] not in (1, 3):
        raise ModelError(f"{what} takes input shape {shape}; expected [1, H, W, 3] (an image classifier)")
    dtype = np.dtype(ins[0]["dtype"]).name
    if dtype not in ("float32", "uint8", "int8"):
        raise ModelError(f"{what} takes {dtype} input; expected float32, uint8 or int8")
    if spec is None:
        spec = _derive_spec(ins[0], color_order, normalization, resize)
    elif [int(s) for s in spec.shape] != shape or spec.dtype != dtype:
        raise ModelError(f"{what}: the input spec says {spec.dtype}{list(spec.shape)} but the model takes "
                         f"{dtype}{shape}; the bundle and its model do not match")
    out_size = int(np.prod(outs[0]["shape"]))
    if labels is None:
        labels = [str(i) for i in range(out_size)]
    elif len(labels) != out_size:
        raise ModelError(f"{what} outputs {out_size} scores but {len(labels)} labels were given")
    ref = kestrel_pb2.ModelRef(name=name, version=int(version), sha256=hashlib.sha256(data).hexdigest())
    return Model(interp, ref, list(labels), spec, rt_name, threads=int(threads))


def load_labels(path: Union[str, Path]) -> List[str]:
    """Labels file: one label per line, blank lines ignored."""
    return _labels_from_file(path)
