"""One preprocessing definition (trainer == edge) and the typed config."""

from __future__ import annotations

import numpy as np
import pytest

from edge.inference.preprocess import preprocess as edge_preprocess
from proto.errors import ConfigError
from proto.inputspec import InputSpec
from tests.trainer.imgs import pattern
from trainer.config import Config, apply_overrides, config_doc, load_config
from trainer.preprocess import model_input, normalize, normalize_tf, resize_to_input


@pytest.mark.parametrize("norm", ["0_1", "-1_1", "raw"])
@pytest.mark.parametrize("resize", ["stretch", "center_crop"])
def test_stored_pixels_give_the_edge_tensor(norm, resize):
    frame = np.ascontiguousarray(np.concatenate([pattern(5, 60), pattern(6, 60)], axis=1))  # 60x120 BGR
    f_spec = InputSpec(shape=[1, 24, 24, 3], normalization=norm, resize=resize)
    q_spec = InputSpec(shape=[1, 24, 24, 3], dtype="uint8", scale=0.0123, zero_point=7, normalization=norm,
                       resize=resize)
    pixels = resize_to_input(frame, f_spec)
    assert np.array_equal(model_input(pixels, q_spec), edge_preprocess(frame, q_spec))
    np.testing.assert_allclose(normalize(pixels, norm)[None], edge_preprocess(frame, f_spec), rtol=1e-6, atol=1e-6)


def test_tf_normalization_matches_numpy():
    from trainer.tfenv import tf

    p = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    for norm in ("0_1", "-1_1", "raw"):
        got = normalize_tf(tf().constant(p, tf().float32), norm).numpy()
        np.testing.assert_allclose(got, normalize(p, norm), atol=1e-6)


def test_grey_model_input():
    spec = InputSpec(shape=[1, 16, 16, 1], dtype="uint8", scale=1 / 255)
    frame = pattern(9, 32)
    assert np.array_equal(model_input(resize_to_input(frame, InputSpec(shape=[1, 16, 16, 1])), spec),
                          edge_preprocess(frame, spec))


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text("[train]\nepochz = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'train.epochz'"):
        load_config(str(p))
    p.write_text("[model]\narch = 'resnet'\n")
    with pytest.raises(ConfigError, match="arch must be one of"):
        load_config(str(p))
    p.write_text("[optimize]\nsparsity = 0.8\n[train]\nfolds = 3\n")
    cfg = load_config(str(p))
    assert cfg.optimize.sparsity == 0.8 and cfg.train.folds == 3 and cfg.train.epochs == Config().train.epochs


def test_cli_overrides_win():
    cfg = apply_overrides(Config(), {"train.folds": 2, "model.arch": "mobilenet_v2", "model.input_size": 64,
                                     "train.epochs": None})
    assert (cfg.train.folds, cfg.model.arch, cfg.train.epochs) == (2, "mobilenet_v2", Config().train.epochs)
    with pytest.raises(ConfigError, match="input_size"):
        apply_overrides(Config(), {"model.arch": "mobilenet_v2", "model.input_size": 16})


def test_config_doc_documents_every_field():
    import dataclasses

    doc = config_doc()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.type if not isinstance(section.type, str) else
                                    type(getattr(Config(), section.name))):
            line = next(ln for ln in doc.splitlines() if ln.startswith(f"- `{section.name}.{f.name}`"))
            default = getattr(getattr(Config(), section.name), f.name)
            assert f"default {default!r}" in line and len(f.metadata["doc"]) >= 15 and f.metadata["doc"] in line


def test_docs_list_every_config_field():
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "trainer.md").read_text()
    for line in config_doc().splitlines():
        if line.startswith("- `"):
            assert line.split(":")[0] in docs


def _batch(cfg, images, labels, training, seed=1):  # noqa: ANN001, ANN202
    from trainer.train import make_dataset

    x, y = next(iter(make_dataset(images, labels, cfg, training=training, seed=seed)))
    return x.numpy(), y.numpy()


def test_augmentation_changes_training_pixels_only():
    images = np.stack([pattern(40 + i, 32) for i in range(4)])
    labels = np.arange(4)                       # label i = image i, to find each sample's source
    cfg = apply_overrides(Config(), {"train.batch_size": 4})
    clean = normalize(images, "0_1")
    x, y = _batch(cfg, images, labels, training=False)
    np.testing.assert_allclose(x, clean, atol=1e-6)                  # evaluation: exactly the normalization
    x, y = _batch(cfg, images, labels, training=True)
    assert sorted(y.tolist()) == [0, 1, 2, 3] and x.shape == clean.shape
    assert x.min() >= 0.0 and x.max() <= 1.0
    for xi, yi in zip(x, y):
        assert np.abs(xi - clean[yi]).mean() > 0.005                 # flip/crop/brightness/contrast applied
    off = apply_overrides(Config(), {"train.batch_size": 4, "train.augment": False})
    x, y = _batch(off, images, labels, training=True)
    for xi, yi in zip(x, y):
        np.testing.assert_allclose(xi, clean[yi], atol=1e-6)


def test_flip_only_augmentation_mirrors_or_keeps():
    images = np.stack([pattern(60 + i, 32) for i in range(8)])
    labels = np.arange(8)
    cfg = apply_overrides(Config(), {"train.batch_size": 8, "train.crop": 0.0, "train.brightness": 0.0,
                                     "train.contrast": 0.0})
    clean = normalize(images, "0_1")
    seen = set()
    for seed in (1, 2):
        x, y = _batch(cfg, images, labels, training=True, seed=seed)
        for xi, yi in zip(x, y):
            same, mirrored = np.allclose(xi, clean[yi], atol=1e-6), np.allclose(xi, clean[yi][:, ::-1], atol=1e-6)
            assert same or mirrored
            seen.add("mirrored" if mirrored else "same")
    assert seen == {"same", "mirrored"}
    no_flip = apply_overrides(Config(), {"train.batch_size": 8, "train.crop": 0.0, "train.brightness": 0.0,
                                         "train.contrast": 0.0, "train.flip": False})
    x, y = _batch(no_flip, images, labels, training=True)
    for xi, yi in zip(x, y):
        np.testing.assert_allclose(xi, clean[yi], atol=1e-6)
