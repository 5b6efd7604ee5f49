"""The trainer's typed TOML config (proto.tomlconf: unknown keys rejected). CLI flags override fields.

Example ``train.toml``::

    [data]
    min_side = 16
    [model]
    arch = "small_cnn"
    input_size = 32
    [train]
    epochs = 5
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from proto.tomlconf import describe, field, load

ARCHS = ("small_cnn", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")
MOBILENET_V3 = ("mobilenet_v3_small", "mobilenet_v3_large")
IO_DTYPES = ("uint8", "int8")


@dataclasses.dataclass
class DataConfig:
    min_side: int = field(8, doc="Images whose shorter side is below this many pixels are dropped as 'tiny'.")
    phash_distance: int = field(
        4, doc="Images whose 64-bit perceptual hashes differ in at most this many bits are near duplicates: "
        "kept, but always on the same side of every split.")
    test_fraction: float = field(0.2, doc="Share of the (grouped) images held out as the final test split.")
    seed: int = field(0, doc="Seed for splits, augmentation and weight initialisation.")

    def validate(self) -> None:
        if self.min_side < 1:
            raise ValueError("min_side must be >= 1")
        if not 0 <= self.phash_distance <= 64:
            raise ValueError("phash_distance must be 0..64")
        if not 0.05 <= self.test_fraction <= 0.5:
            raise ValueError("test_fraction must be between 0.05 and 0.5")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")


@dataclasses.dataclass
class ModelConfig:
    arch: str = field("small_cnn", doc=f"Network: one of {', '.join(ARCHS)}. small_cnn suits tiny data sets.")
    input_size: int = field(32, doc="Model input height = width in pixels.")
    channels: int = field(3, doc="Input channels: 3 (colour) or 1 (grey; small_cnn only).")
    alpha: float = field(0.35, doc="Width multiplier of the MobileNets (ImageNet weights exist for V2: 0.35, 0.5, "
                         "0.75, 1.0, 1.3, 1.4; V3: 0.75, 1.0).")
    width: int = field(16, doc="Filters of the first small_cnn block (doubled per block).")
    weights: str = field("", doc="Path of a Keras ImageNet weights file (.h5) for the MobileNet backbone; "
                         "empty = train from scratch. Must match arch, alpha and input size.")
    color_order: str = field("rgb", doc="Channel order the model expects (recorded in the bundle input spec).")
    normalization: str = field("0_1", doc="Pixel normalization: 0_1, -1_1 or raw (recorded in the input spec). "
                               "MobileNets with ImageNet weights want -1_1.")
    resize: str = field("stretch", doc="How frames are resized to the input: stretch or center_crop.")

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if not 8 <= self.input_size <= 1024:
            raise ValueError("input_size must be 8..1024")
        if not 0.0 < self.alpha <= 2.0:
            raise ValueError("alpha must be > 0 and <= 2")
        if not 1 <= self.width <= 512:
            raise ValueError("width must be 1..512")
        if self.channels not in (1, 3):
            raise ValueError("channels must be 1 or 3")
        if self.channels == 1 and self.arch != "small_cnn":
            raise ValueError("channels = 1 works only with arch small_cnn")
        if self.arch.startswith("mobilenet") and self.input_size < 32:
            raise ValueError("MobileNets need input_size >= 32")
        from proto.inputspec import COLOR_ORDERS, NORMALIZATIONS, RESIZES

        for name, value, allowed in (("color_order", self.color_order, COLOR_ORDERS),
                                     ("normalization", self.normalization, NORMALIZATIONS),
                                     ("resize", self.resize, RESIZES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.weights and self.arch == "small_cnn":
            raise ValueError("weights is only for the MobileNet architectures; small_cnn trains from scratch")
        if self.weights and self.normalization != "-1_1":
            # Keras' ImageNet MobileNet weights were trained on p/127.5 - 1; 0..1 inputs silently cost accuracy.
            raise ValueError(f"ImageNet weights expect normalization '-1_1' (pixels / 127.5 - 1), got "
                             f"{self.normalization!r}: pass --normalization=-1_1")


@dataclasses.dataclass
class TrainConfig:
    epochs: int = field(10, doc="Training epochs of the final model (and of each cross-validation fold). With "
                        "ImageNet weights: the fine-tuning epochs after the head_epochs.")
    batch_size: int = field(32, doc="Mini-batch size.")
    learning_rate: float = field(1e-3, doc="Adam learning rate.")
    deterministic: bool = field(True, doc="Reproducible training: the same data, config and data.seed give the "
                                "same model, bit for bit (TensorFlow's op determinism; on this CPU it was "
                                "faster, not slower). false lets TensorFlow pick faster non-deterministic "
                                "kernels where it has them (GPUs); runs then differ from each other.")
    folds: int = field(5, doc="k of the stratified k-fold cross-validation (0 or 1 = skip CV).")
    cv_epochs: int = field(0, doc="Epochs per CV fold; 0 = same as epochs.")
    augment: bool = field(True, doc="Random flip, crop and brightness/contrast during training.")
    flip: bool = field(True, doc="Horizontal flips in augmentation (disable for digits/text).")
    crop: float = field(0.1, doc="Random crop: up to this share of each side is cut, then resized back.")
    brightness: float = field(0.15, doc="Random brightness shift, as a share of full scale.")
    contrast: float = field(0.15, doc="Random contrast factor range (1 +- contrast).")
    head_epochs: int = field(3, doc="Transfer learning only (model.weights set): epochs training the new "
                             "classifier head on the frozen backbone before fine-tuning everything.")
    fine_tune_lr_scale: float = field(0.1, doc="Transfer learning only: the fine-tuning learning rate is "
                                      "learning_rate x this (small, so the ImageNet features are not wiped out).")

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not 0 <= self.folds <= 20:
            raise ValueError("folds must be 0..20 (0 or 1 = skip cross-validation)")
        if self.cv_epochs < 0 or self.head_epochs < 0:
            raise ValueError("cv_epochs and head_epochs must be >= 0")
        if not 0.0 < self.learning_rate < 1.0:
            raise ValueError("learning_rate must be > 0 and < 1")
        if not 0.0 < self.fine_tune_lr_scale <= 1.0:
            raise ValueError("fine_tune_lr_scale must be > 0 and <= 1")
        if not 0.0 <= self.crop <= 0.5:
            raise ValueError("crop must be 0..0.5 (share of each side cut off)")
        if not 0.0 <= self.brightness <= 1.0 or not 0.0 <= self.contrast <= 1.0:
            raise ValueError("brightness and contrast must be 0..1")


@dataclasses.dataclass
class OptimizeConfig:
    sparsity: float = field(0.5, doc="Target weight sparsity of magnitude pruning (0 = no pruning).")
    initial_sparsity: float = field(0.0, doc="Sparsity at the start of the PolynomialDecay schedule.")
    prune_epochs: int = field(3, doc="Fine-tuning epochs with pruning; sparsity ramps over the first 2/3. "
                              "At least 30 steps are run (more epochs on tiny data sets).")
    qat: bool = field(False, doc="Pruning-preserving quantization-aware training after pruning (tfmot PQAT).")
    qat_epochs: int = field(2, doc="Epochs of pruning-preserving QAT when qat = true.")
    io_dtype: str = field("uint8", doc="Input/output type of the int8 model: uint8 or int8.")
    per_channel: bool = field(True, doc="Per-channel int8 weights (one scale per output channel, the TFLite "
                              "default). false = one scale per tensor: about 12 bytes less per channel in the "
                              ".tflite (MobileNetV2-0.35: int8 file 0.27x instead of 0.38x the float one) but "
                              "coarser depthwise weights; the gate decides whether the accuracy holds.")
    representative_samples: int = field(100, doc="Training images fed to the int8 converter's calibration.")

    def validate(self) -> None:
        if not 0.0 <= self.sparsity < 1.0 or not 0.0 <= self.initial_sparsity <= self.sparsity:
            raise ValueError("need 0 <= initial_sparsity <= sparsity < 1")
        if self.io_dtype not in IO_DTYPES:
            raise ValueError(f"io_dtype must be one of {IO_DTYPES}")
        if self.representative_samples < 1:
            raise ValueError("representative_samples must be >= 1")
        if self.prune_epochs < 1 or self.qat_epochs < 1:
            raise ValueError("prune_epochs and qat_epochs must be >= 1")


@dataclasses.dataclass
class GateConfig:
    max_accuracy_drop: float = field(1.0, doc="Packaging is refused when the int8 model's held-out accuracy is "
                                     "more than this many percentage points below the float model's. One test "
                                     "image is worth 100 / n_test points: keep n_test >= 100 / this.")
    self_test_cases: int = field(4, doc="Held-out inputs stored in the bundle as self-test cases (1..64; one per "
                                 "class first).")
    self_test_tolerance: float = field(0.02, doc="Max absolute score difference a device may show on self-test "
                                       "(> 0 and <= 1; devices use at most their own "
                                       "update.self_test_max_tolerance, default 0.1).")
    latency_budget_ms: float = field(0.0, doc="Self-test latency budget per inference recorded in the bundle; "
                                     "0 = none (the device's own update.self_test_latency_ms decides). A "
                                     "device uses the smaller of the two, so only set it for the slowest "
                                     "device class you deploy to, never from a desktop measurement.")
    errors_to_catch: float = field(0.8, doc="Share of the int8 model's held-out errors the bundle's default "
                                   "sampling threshold must send to the hub: the trainer sweeps the device's "
                                   "confidence rule on the held-out split and takes the lowest threshold that "
                                   "catches this share, i.e. the fewest frames sent (0 < x <= 1).")
    default_threshold: Optional[float] = field(None, doc="Default confidence threshold recorded in the bundle "
                                               "(0..1). Unset = chosen from the held-out data (errors_to_catch; "
                                               "the device default 0.6 when the model made no held-out errors). "
                                               "A value set here wins over the data's choice; a device's own "
                                               "[sampler] confidence_threshold wins over both.")
    model_name: str = field("kestrel-classifier", doc="Model name recorded in the bundle (1-64 of A-Z a-z 0-9 . _ -).")
    expires_in_days: float = field(365.0, doc="Bundle validity in days (> 0, <= 3650).")

    def validate(self) -> None:
        from proto.bundle import valid_model_name

        if not 0.0 <= self.max_accuracy_drop <= 100.0:
            raise ValueError("max_accuracy_drop must be 0..100 accuracy points")
        if not 1 <= self.self_test_cases <= 64:
            raise ValueError("self_test_cases must be 1..64 (devices refuse a bundle without self-test cases)")
        if not 0.0 < self.self_test_tolerance <= 1.0:
            raise ValueError("self_test_tolerance must be > 0 and <= 1")
        if not 0.0 <= self.latency_budget_ms <= 3_600_000.0:
            raise ValueError("latency_budget_ms must be 0..3600000 (0 = none: the device decides)")
        if self.default_threshold is not None and not 0.0 <= self.default_threshold <= 1.0:
            raise ValueError("default_threshold must be 0..1 (or unset: chosen from the held-out data)")
        if not 0.0 < self.errors_to_catch <= 1.0:
            raise ValueError("errors_to_catch must be > 0 and <= 1 (a share of the held-out errors)")
        if not valid_model_name(self.model_name):
            raise ValueError(f"model_name {self.model_name!r} must be 1-64 characters of A-Z a-z 0-9 . _ - "
                             "(starting with a letter or digit)")
        if not 0.0 < self.expires_in_days <= 3650.0:
            raise ValueError("expires_in_days must be > 0 and <= 3650")


@dataclasses.dataclass
class Config:
    data: DataConfig = field(factory=DataConfig, doc="Ingestion and cleaning.")
    model: ModelConfig = field(factory=ModelConfig, doc="Network and input contract.")
    train: TrainConfig = field(factory=TrainConfig, doc="Training and cross-validation.")
    optimize: OptimizeConfig = field(factory=OptimizeConfig, doc="Pruning and int8 quantization.")
    gate: GateConfig = field(factory=GateConfig, doc="Evaluation gate and bundle contents.")

    def validate(self) -> None:
        if self.optimize.qat and self.model.arch in MOBILENET_V3:
            # tfmot's quantize_apply cannot clone V3's hard-swish (TFOpLambda `x + 3.0`) layers.
            raise ValueError(f"optimize.qat does not support {self.model.arch} (tfmot cannot rebuild its "
                             "hard-swish layers): use post-training int8 (qat = false) or mobilenet_v2 / small_cnn")


def load_config(path: Optional[str]) -> Config:
    return load(Config, path)


def apply_overrides(cfg: Config, overrides: Dict[str, Any]) -> Config:
    """Set ``section.key`` fields (CLI flags) that are not None; validates again."""
    from proto.tomlconf import from_dict, to_dict

    data = to_dict(cfg)
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, key = dotted.split(".", 1)
        data[section][key] = value
    return from_dict(Config, data)


def config_doc() -> str:
    return "\n".join(describe(Config))
