"""Training: augmentation in tf.data, stratified group k-fold CV (mean +- std of accuracy and macro F1),
and the final model trained on the training split and measured on the held-out test split."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from trainer.config import Config
from trainer.models import build_model, compile_model
from trainer.preprocess import normalize, normalize_tf
from trainer.split import kfold
from trainer.tfenv import tf


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
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=list(range(n_classes)), zero_division=0)),
        "confusion": confusion_matrix(y_true, y_pred, labels=list(range(n_classes))).tolist(),
    }


def fit(images: np.ndarray, labels: np.ndarray, n_classes: int, cfg: Config, epochs: int,
        val: Optional[tuple] = None, seed: int = 0, callbacks: Optional[List[Any]] = None) -> tuple:
    model = build_model(cfg.model, n_classes, seed=seed)
    compile_model(model, cfg.train.learning_rate)
    vds = make_dataset(val[0], val[1], cfg, training=False) if val is not None else None
    hist = model.fit(make_dataset(images, labels, cfg, training=True, seed=seed), epochs=epochs,
                     validation_data=vds, verbose=0, callbacks=callbacks or [])
    return model, {k: [float(v) for v in vals] for k, vals in hist.history.items()}


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
