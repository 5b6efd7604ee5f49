"""Training: augmentation in tf.data, stratified group k-fold CV (mean +- std of accuracy and macro F1),
and the final model trained on the training split and measured on the held-out test split."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from trainer.config import Config
from trainer.models import build_model, compile_model, freeze_backbone, unfreeze_for_fine_tuning
from trainer.preprocess import normalize, normalize_tf
from trainer.split import kfold
from trainer.tfenv import configure, tf


def make_dataset(images: np.ndarray, labels: np.ndarray, cfg: Config, training: bool, seed: int = 0) -> Any:
    t = tf()
    norm = cfg.model.normalization
    ds = t.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
    if training:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    tc = cfg.train
    h, w = images.shape[1], images.shape[2]

    def aug(x: Any, y: Any) -> Any:
        x = t.cast(x, t.float32)
        if training and tc.augment:
            if tc.flip:
                x = t.image.random_flip_left_right(x)
            if tc.crop > 0:
                frac = t.random.uniform([], 1.0 - tc.crop, 1.0)
                ch = t.cast(t.round(frac * h), t.int32)
                cw = t.cast(t.round(frac * w), t.int32)
                x = t.image.random_crop(x, t.stack([ch, cw, t.shape(x)[-1]]))
                x = t.image.resize(x, (h, w))
            if tc.brightness > 0:
                x = x + t.random.uniform([], -tc.brightness, tc.brightness) * 255.0
            if tc.contrast > 0:
                mean = t.reduce_mean(x)
                x = (x - mean) * t.random.uniform([], 1.0 - tc.contrast, 1.0 + tc.contrast) + mean
            x = t.clip_by_value(x, 0.0, 255.0)
        return normalize_tf(x, norm), y

    return ds.map(aug, num_parallel_calls=2).batch(tc.batch_size).prefetch(2)


def predict_float(model: Any, images: np.ndarray, cfg: Config) -> np.ndarray:
    return np.asarray(model.predict(normalize(images, cfg.model.normalization), batch_size=256, verbose=0))


def metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> Dict[str, Any]:
    """Accuracy, macro F1, the confusion matrix (rows = true class) and per-class precision, recall, F1 and
    support (a class never predicted has precision 0, as sklearn's zero_division=0 says)."""
    labels = list(range(n_classes))
    p, r, f, n = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)),
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "per_class": {"precision": [float(x) for x in p], "recall": [float(x) for x in r],
                      "f1": [float(x) for x in f], "support": [int(x) for x in n]},
    }


def bn_momentum(steps_per_epoch: int) -> float:
    """BatchNorm moving-average momentum so the statistics average over about half an epoch of steps
    (1 - 2/steps, within 0.5..0.99).

    Keras' defaults (0.99; 0.999 in MobileNetV2) average over 100-1000 steps: on the small data sets this
    trainer is for, a whole training run is fewer steps than that, the moving statistics lag the weights
    and the inference-mode model (what gets exported) scores near chance while the training-mode one is
    fine. Measured on 4 digits (96 training images, 8 epochs): momentum 0.9 -> 30-64 % held-out
    accuracy, 0.7 -> 94-96 %; on 192 images, 3 seeds: one epoch's average 85-98 %, half an epoch's 96-100 %."""
    return float(min(0.99, max(0.5, 1.0 - 2.0 / max(1, steps_per_epoch))))


def set_bn_momentum(model: Any, momentum: float) -> None:
    keras = tf().keras
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def total_epochs(cfg: Config, epochs: int) -> int:
    """Epochs fit() runs: with ImageNet weights the frozen-backbone head epochs come first."""
    return epochs + (cfg.train.head_epochs if cfg.model.weights else 0)


def fit(images: np.ndarray, labels: np.ndarray, n_classes: int, cfg: Config, epochs: int,
        val: Optional[tuple] = None, seed: int = 0, callbacks: Optional[List[Any]] = None) -> tuple:
    """Train a fresh model. From scratch: `epochs` at the learning rate. With ImageNet weights: first
    `train.head_epochs` on the frozen backbone at the learning rate, then `epochs` of fine-tuning (BN
    frozen) at learning_rate x fine_tune_lr_scale. Returns (model, history: one list per metric over
    all epochs, plus "phase": 0 = head, 1 = fine-tune/full)."""
    configure(cfg.train.deterministic)
    model = build_model(cfg.model, n_classes, seed=seed)
    if not cfg.model.weights:       # (ImageNet BatchNorm statistics stay frozen: see unfreeze_for_fine_tuning)
        set_bn_momentum(model, bn_momentum(int(np.ceil(len(images) / cfg.train.batch_size))))
    vds = make_dataset(val[0], val[1], cfg, training=False) if val is not None else None
    train_ds = make_dataset(images, labels, cfg, training=True, seed=seed)
    history: Dict[str, List[float]] = {}
    phases = []
    if cfg.model.weights:
        if cfg.train.head_epochs > 0:
            freeze_backbone(model)
            phases.append((cfg.train.learning_rate, cfg.train.head_epochs, 0))
        phases.append((cfg.train.learning_rate * cfg.train.fine_tune_lr_scale, epochs, 1))
    else:
        phases.append((cfg.train.learning_rate, epochs, 1))
    done = 0
    for lr, n, phase in phases:
        if phase == 1 and cfg.model.weights:
            unfreeze_for_fine_tuning(model)
        compile_model(model, lr)   # (re)compiling after changing `trainable` is what makes it take effect
        hist = model.fit(train_ds, initial_epoch=done, epochs=done + n, validation_data=vds, verbose=0,
                         callbacks=callbacks or [])
        for k, vals in hist.history.items():
            history.setdefault(k, []).extend(float(v) for v in vals)
        history.setdefault("phase", []).extend([float(phase)] * n)
        done += n
    return model, history


def cross_validate(images: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_classes: int, cfg: Config,
                   progress: Optional[Callable[..., Any]] = None) -> Dict[str, Any]:
    k = cfg.train.folds
    if k < 2:
        return {"k": k, "folds": [], "skipped": True}
    epochs = cfg.train.cv_epochs or cfg.train.epochs
    splits = kfold(labels, groups, k, cfg.data.seed)
    it = enumerate(splits) if progress is None else progress(list(enumerate(splits)), desc="cv folds", unit="fold")
    folds = []
    for i, (tr, va) in it:
        model, _ = fit(images[tr], labels[tr], n_classes, cfg, epochs, seed=cfg.data.seed + i + 1)
        pred = predict_float(model, images[va], cfg).argmax(1)
        m = metrics(labels[va], pred, n_classes)
        folds.append({"fold": i, "train": int(len(tr)), "val": int(len(va)),
                      "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})
        tf().keras.backend.clear_session()
    out: Dict[str, Any] = {"k": k, "epochs": epochs, "folds": folds, "skipped": False}
    for key in ("accuracy", "macro_f1"):
        vals = np.array([f[key] for f in folds])
        out[key] = {"mean": float(vals.mean()), "std": float(vals.std())}
    return out


def epoch_bar(progress: Callable[..., Any], epochs: int) -> Any:
    """A Keras callback advancing a progress bar per epoch (shows loss/accuracy)."""
    class EpochBar(tf().keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_begin(self, logs: Any = None) -> None:
            if not hasattr(self, "bar"):
                self.bar = progress(total=epochs, desc="train", unit="epoch")

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs = logs or {}
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k in ("loss", "accuracy", "val_accuracy")})
            self.bar.update(1)
            if self.bar.n >= epochs:
                self.bar.close()

    return EpochBar()
