"""Bundle build/verify round trips, keys, rotation, staging. Python 3.8 compatible."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature

from proto import bundle as B
from proto import bundle_container as C
from proto import keys as K
from proto import manifest as M
from proto.errors import ArtifactError, BundleError
from proto.inputspec import InputSpec
from tests.helpers.bundles import BRIGHTNESS_SPEC, FAKE_MODEL, LABELS, make_bundle, make_keypair, members_of

NOW = 1_800_000_000.0


def test_round_trip_with_the_real_int8_model(tmp_path: Path, models_dir: Path) -> None:
    kp = make_keypair(tmp_path)
    model = (models_dir / "brightness_int8.tflite").read_bytes()
    case_input = bytes(range(256)) * (64 * 64 * 3 // 256)
    st = {"tolerance": 0.1, "latency_budget_ms": 250.0,
          "cases": [{"input": case_input, "expected": [0.2, 0.3, 0.5]}]}
    data = make_bundle(model, kp, version=7, metrics={"accuracy": 0.93}, self_test=st, created=NOW)
    vb = B.verify_bundle(data, kp.trusted, now=NOW + 10)
    m = vb.manifest
    assert vb.model_bytes == model
    assert vb.labels == LABELS
    assert vb.key_id == kp.key_id == K.key_id(kp.public)
    assert vb.bundle_sha256 == hashlib.sha256(data).hexdigest()
    assert (m.model_name, m.version, m.schema_version, m.model_file) == ("brightness", 7, 1, "model.tflite")
    assert m.created == NOW and m.expires == NOW + 365 * 86400
    assert m.input_spec == BRIGHTNESS_SPEC
    assert m.metrics == {"accuracy": 0.93}
    assert m.files["model.tflite"] == M.FileEntry(hashlib.sha256(model).hexdigest(), len(model))
    assert m.self_test.tolerance == 0.1 and m.self_test.latency_budget_ms == 250.0
    assert m.self_test.cases[0].input == case_input
    assert m.self_test.cases[0].expected == [0.2, 0.3, 0.5]
    assert vb.files["labels.txt"] == b"bright\ndark\nmid\n"
    # The real model runs from the verified bytes on the device runtime.
    mod_name = "tflite_runtime.interpreter" if _has("tflite_runtime") else "ai_edge_litert.interpreter"
    interp_mod = pytest.importorskip(mod_name)
    interp = interp_mod.Interpreter(model_content=vb.model_bytes)
    interp.allocate_tensors()
    assert list(interp.get_input_details()[0]["shape"]) == m.input_spec.shape


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def test_manifest_is_canonical_json_and_signature_is_domain_separated(tmp_path: Path) -> None:
    kp = make_keypair(tmp_path)
    data = make_bundle(None, kp, version=1, created=NOW)
    members = members_of(data)
    assert [n for n, _ in members] == ["manifest.json", "manifest.sig", "labels.txt", "model.tflite"]
    manifest_bytes, sig_bytes = members[0][1], members[1][1]
    doc = json.loads(manifest_bytes)
    assert manifest_bytes == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    sig = json.loads(sig_bytes)
    assert sig["alg"] == "ed25519" and sig["key_id"] == kp.key_id
    raw_sig = base64.b64decode(sig["sig"])
    kp.public.verify(raw_sig, b"kestrel-bundle-v1\n" + manifest_bytes)  # raises if wrong
    with pytest.raises(InvalidSignature):
        kp.public.verify(raw_sig, manifest_bytes)  # not a bare signature over the manifest


def test_builds_are_deterministic(tmp_path: Path) -> None:
    kp = make_keypair(tmp_path)
    assert make_bundle(None, kp, version=2, created=NOW) == make_bundle(None, kp, version=2, created=NOW)


def test_read_manifest_unverified_needs_no_key(tmp_path: Path) -> None:
    kp = make_keypair(tmp_path)
    data = make_bundle(None, kp, version=4, name="cam-model", created=NOW)
    m = B.read_manifest_unverified(data)
    assert (m.model_name, m.version) == ("cam-model", 4)


def test_version_checks(tmp_path: Path) -> None:
    kp = make_keypair(tmp_path)
    data = make_bundle(None, kp, version=5, created=NOW)
    assert B.verify_bundle(data, kp.trusted, installed_version=4, now=NOW).manifest.version == 5
    with pytest.raises(BundleError) as e:
        B.verify_bundle(data, kp.trusted, installed_version=5, now=NOW)
    assert e.value.reason == "same_version"
    with pytest.raises(BundleError) as e:
        B.verify_bundle(data, kp.trusted, installed_version=6, now=NOW)
    assert e.value.reason == "downgrade"


def test_key_rotation_two_trusted_keys_then_one_removed(tmp_path: Path) -> None:
    old, new = make_keypair(tmp_path, "old"), make_keypair(tmp_path, "new")
    trust = tmp_path / "trust"
    trust.mkdir()
    for kp in (old, new):
        (trust / f"{kp.key_id}.pub").write_bytes(kp.pub_path.read_bytes())
    keys = K.load_public_keys(trust)
    assert set(keys) == {old.key_id, new.key_id}
    by_old = make_bundle(None, old, version=1, created=NOW)
    by_new = make_bundle(None, new, version=2, created=NOW)
    assert B.verify_bundle(by_old, keys, now=NOW).key_id == old.key_id
    assert B.verify_bundle(by_new, keys, now=NOW).key_id == new.key_id
    (trust / f"{old.key_id}.pub").unlink()  # rotation finished: the old key is retired
    keys = K.load_public_keys(trust)
    assert set(keys) == {new.key_id}
    assert B.verify_bundle(by_new, keys, now=NOW).manifest.version == 2
    with pytest.raises(BundleError) as e:
        B.verify_bundle(by_old, keys, now=NOW)
    assert e.value.reason == "untrusted_key" and old.key_id in str(e.value)


def test_generate_keypair_files(tmp_path: Path) -> None:
    priv, pub = K.generate_keypair(tmp_path / "k")
    assert priv.name == "signing.key" and pub.name == "signing.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    doc = json.loads(pub.read_text())
    key = K.load_private_key(priv)
    assert doc["key_id"] == K.key_id(key.public_key()) == hashlib.sha256(
        base64.b64decode(doc["public_key"])).hexdigest()[:16]
    assert list(K.load_public_keys(pub)) == [doc["key_id"]]
    kid, sig = K.sign(key, b"x")
    assert kid == doc["key_id"] and len(sig) == 64
    with pytest.raises(ArtifactError, match="refusing to overwrite"):
        K.generate_keypair(tmp_path / "k")


def test_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    priv, _ = K.generate_keypair(tmp_path)
    os.chmod(str(priv), 0o644)
    with pytest.raises(K.KeyFileError, match="chmod 600"):
        K.load_private_key(priv)


def test_bad_key_files(tmp_path: Path) -> None:
    with pytest.raises(K.KeyFileError, match="does not exist"):
        K.load_public_keys(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(K.KeyFileError, match="no \\*.pub"):
        K.load_public_keys(empty)
    _, pub = K.generate_keypair(tmp_path / "a")
    doc = json.loads(pub.read_text())
    doc["key_id"] = "0" * 16
    bad = tmp_path / "lying.pub"
    bad.write_text(json.dumps(doc))
    with pytest.raises(K.KeyFileError, match="does not match"):
        K.load_public_keys(bad)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    os.chmod(str(garbage), 0o600)
    with pytest.raises(K.KeyFileError, match="PEM"):
        K.load_private_key(garbage)


def test_write_staged_writes_only_verified_files(tmp_path: Path) -> None:
    kp = make_keypair(tmp_path)
    data = make_bundle(None, kp, version=1, created=NOW, extra_files={"notes.txt": b"hello"})
    vb = B.verify_bundle(data, kp.trusted, now=NOW)
    stage = tmp_path / "stage"
    # a planted symlink in the staging dir is replaced, not written through
    stage.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep me")
    os.symlink(str(outside), str(stage / "model.tflite"))
    B.write_staged(vb, stage)
    assert sorted(p.name for p in stage.iterdir()) == [
        "labels.txt", "manifest.json", "manifest.sig", "model.tflite", "notes.txt"]
    assert (stage / "model.tflite").read_bytes() == FAKE_MODEL
    assert not (stage / "model.tflite").is_symlink()
    assert outside.read_bytes() == b"keep me"
    # the staged manifest and signature still verify as a bundle
    members = [("manifest.json", (stage / "manifest.json").read_bytes()),
               ("manifest.sig", (stage / "manifest.sig").read_bytes())]
    members += sorted((n, (stage / n).read_bytes()) for n in vb.files)
    assert C.write_container(members) == data


def test_build_refuses_what_verify_would_refuse(tmp_path: Path) -> None:
    kp = make_keypair(tmp_path)
    with pytest.raises(BundleError) as e:
        make_bundle(None, kp, version=0)
    assert e.value.reason == "bad_manifest"
    with pytest.raises(BundleError, match="labels"):
        make_bundle(None, kp, version=1, labels=["a", "a"])
    with pytest.raises(BundleError, match="input is 3 bytes"):
        make_bundle(None, kp, version=1, self_test={"cases": [{"input": b"abc", "expected": [1, 0, 0]}]})
    with pytest.raises(BundleError, match="clashes"):
        make_bundle(None, kp, version=1, extra_files={"manifest.sig": b""})


def test_float_input_spec_and_unicode_labels(tmp_path: Path) -> None:
    kp = make_keypair(tmp_path)
    spec = InputSpec(shape=[1, 2, 2, 1], dtype="float32")
    case = {"input": b"\0" * 16, "expected": [1.0, 0.0]}
    data = make_bundle(None, kp, version=1, spec=spec, labels=["chat", "é"], created=NOW,
                       self_test={"tolerance": 0.0, "cases": [case], "latency_budget_ms": None})
    vb = B.verify_bundle(data, kp.trusted, now=NOW)
    assert vb.labels == ["chat", "é"] and vb.manifest.input_spec == spec
    assert vb.manifest.self_test.latency_budget_ms is None
