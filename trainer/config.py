"""The trainer's typed TOML config (edge.tomlconf: unknown keys rejected). CLI flags override fields.

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

from edge.tomlconf import describe, field, load

ARCHS = ("small_cnn", "mobilenet_v2", "mobilenet_v3_small")
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


@dataclasses.dataclass
class ModelConfig:
    arch: str = field("small_cnn", doc=f"Network: one of {', '.join(ARCHS)}. small_cnn suits tiny data sets.")
    input_size: int = field(32, doc="Model input height = width in pixels.")
    channels: int = field(3, doc="Input channels: 3 (colour) or 1 (grey; small_cnn only).")
    alpha: float = field(0.35, doc="Width multiplier of MobileNetV2/V3Small.")
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
        if self.input_size < 8:
            raise ValueError("input_size must be >= 8")
        if self.channels not in (1, 3):
            raise ValueError("channels must be 1 or 3")
        if self.channels == 1 and self.arch != "small_cnn":
            raise ValueError("channels = 1 works only with arch small_cnn")
        if self.arch.startswith("mobilenet") and self.input_size < 32:
            raise ValueError("MobileNets need input_size >= 32")
        from edge.inputspec import COLOR_ORDERS, NORMALIZATIONS, RESIZES

        for name, value, allowed in (("color_order", self.color_order, COLOR_ORDERS),
                                     ("normalization", self.normalization, NORMALIZATIONS),
                                     ("resize", self.resize, RESIZES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclasses.dataclass
class TrainConfig:
    epochs: int = field(10, doc="Training epochs of the final model (and of each cross-validation fold).")
    batch_size: int = field(32, doc="Mini-batch size.")
    learning_rate: float = field(1e-3, doc="Adam learning rate.")
    folds: int = field(5, doc="k of the stratified k-fold cross-validation (0 or 1 = skip CV).")
    cv_epochs: int = field(0, doc="Epochs per CV fold; 0 = same as epochs.")
    augment: bool = field(True, doc="Random flip, crop and brightness/contrast during training.")
    flip: bool = field(True, doc="Horizontal flips in augmentation (disable for digits/text).")
    crop: float = field(0.1, doc="Random crop: up to this share of each side is cut, then resized back.")
    brightness: float = field(0.15, doc="Random brightness shift, as a share of full scale.")
    contrast: float = field(0.15, doc="Random contrast factor range (1 +- contrast).")

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.folds < 0:
            raise ValueError("folds must be >= 0")


@dataclasses.dataclass
class OptimizeConfig:
    sparsity: float = field(0.5, doc="Target weight sparsity of magnitude pruning (0 = no pruning).")
    initial_sparsity: float = field(0.0, doc="Sparsity at the start of the PolynomialDecay schedule.")
    prune_epochs: int = field(3, doc="Fine-tuning epochs with pruning; sparsity ramps over the first 2/3. "
                              "At least 30 steps are run (more epochs on tiny data sets).")
    qat: bool = field(False, doc="Pruning-preserving quantization-aware training after pruning (tfmot PQAT).")
    qat_epochs: int = field(2, doc="Epochs of pruning-preserving QAT when qat = true.")
    io_dtype: str = field("uint8", doc="Input/output type of the int8 model: uint8 or int8.")
    representative_samples: int = field(100, doc="Training images fed to the int8 converter's calibration.")

    def validate(self) -> None:
        if not 0.0 <= self.sparsity < 1.0 or not 0.0 <= self.initial_sparsity <= self.sparsity:
            raise ValueError("need 0 <= initial_sparsity <= sparsity < 1")
        if self.io_dtype not in IO_DTYPES:
            raise ValueError(f"io_dtype must be one of {IO_DTYPES}")
        if self.representative_samples < 1:
            raise ValueError("representative_samples must be >= 1")


@dataclasses.dataclass
class GateConfig:
    max_accuracy_drop: float = field(1.0, doc="Packaging is refused when the int8 model's held-out accuracy is "
                                     "more than this many percentage points below the float model's.")
    self_test_cases: int = field(4, doc="Held-out inputs stored in the bundle as self-test cases.")
    self_test_tolerance: float = field(0.02, doc="Max absolute score difference a device may show on self-test.")
    latency_budget_ms: float = field(0.0, doc="Self-test latency budget per inference; 0 = 20 x measured here "
                                     "(at least 50 ms).")
    default_threshold: float = field(0.6, doc="Default confidence threshold recorded in the bundle.")
    model_name: str = field("kestrel-classifier", doc="Model name recorded in the bundle.")
    expires_in_days: float = field(365.0, doc="Bundle validity in days.")


@dataclasses.dataclass
class Config:
    data: DataConfig = field(factory=DataConfig, doc="Ingestion and cleaning.")
    model: ModelConfig = field(factory=ModelConfig, doc="Network and input contract.")
    train: TrainConfig = field(factory=TrainConfig, doc="Training and cross-validation.")
    optimize: OptimizeConfig = field(factory=OptimizeConfig, doc="Pruning and int8 quantization.")
    gate: GateConfig = field(factory=GateConfig, doc="Evaluation gate and bundle contents.")


def load_config(path: Optional[str]) -> Config:
    return load(Config, path)


def apply_overrides(cfg: Config, overrides: Dict[str, Any]) -> Config:
    """Set ``section.key`` fields (CLI flags) that are not None; validates again."""
    from edge.tomlconf import from_dict, to_dict

    data = to_dict(cfg)
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, key = dotted.split(".", 1)
        data[section][key] = value
    return from_dict(Config, data)


def config_doc() -> str:
    return "\n".join(describe(Config))
