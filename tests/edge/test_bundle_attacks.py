"""The attack corpus: every hostile bundle is refused with its precise reason. Python 3.8 compatible."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from proto import bundle as B
from proto import keys as K
from proto import manifest as M
from proto.errors import BundleError
from tests.helpers.bundles import (
    KeyPair,
    make_bundle,
    make_keypair,
    members_of,
    raw_container,
    rebuild,
    tar_header,
)

NOW = 1_800_000_000.0
DAY = 86400.0


@pytest.fixture
def kp(tmp_path: Path) -> KeyPair:
    return make_keypair(tmp_path)


@pytest.fixture
def good(kp: KeyPair) -> bytes:
    return make_bundle(None, kp, version=3, created=NOW)


def refused(data: bytes, trusted: Dict[str, K.PublicKey], **kw: Any) -> BundleError:
    kw.setdefault("now", NOW)
    with pytest.raises(BundleError) as e:
        B.verify_bundle(data, trusted, **kw)
    assert str(e.value).startswith(f"bundle refused: {e.value.reason}: ")
    return e.value


def replace_member(data: bytes, name: str, content: bytes) -> bytes:
    return rebuild([(n, content if n == name else c) for n, c in members_of(data)])


def resign(key: K.SigningKey, doc: Dict[str, Any], payload: List[Tuple[str, bytes]],
           manifest_bytes: bytes = b"") -> bytes:
    """A container whose manifest (any content) is properly signed by ``key``."""
    mb = manifest_bytes or M.canonical_json(doc)
    kid, sig = K.sign(key, B.DOMAIN + mb)
    sig_bytes = M.canonical_json({"alg": "ed25519", "key_id": kid, "sig": base64.b64encode(sig).decode()})
    return rebuild([("manifest.json", mb), ("manifest.sig", sig_bytes)] + sorted(payload))


def doc_and_payload(data: bytes) -> Tuple[Dict[str, Any], List[Tuple[str, bytes]]]:
    members = members_of(data)
    return json.loads(members[0][1]), members[2:]


# ---- tampering -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.tflite", "labels.txt"])
@pytest.mark.parametrize("where", [0, -1, "middle"])
def test_byte_flipped_in_a_payload_file(kp: KeyPair, good: bytes, name: str, where: Any) -> None:
    content = bytearray(dict(members_of(good))[name])
    i = len(content) // 2 if where == "middle" else where
    content[i] ^= 0x01
    assert refused(replace_member(good, name, bytes(content)), kp.trusted).reason == "hash_mismatch"


def test_byte_flipped_in_the_raw_bundle_inside_the_model(kp: KeyPair, good: bytes) -> None:
    i = good.index(b"TFL3-not-really")
    bad = bytearray(good)
    bad[i + 5] ^= 0x80
    e = refused(bytes(bad), kp.trusted)
    assert e.reason == "hash_mismatch" and "model.tflite" in str(e)


def test_byte_flipped_in_the_manifest(kp: KeyPair, good: bytes) -> None:
    mb = bytearray(dict(members_of(good))["manifest.json"])
    i = mb.index(b'"version":3')
    mb[i + len('"version":')] = ord("9")
    assert refused(replace_member(good, "manifest.json", bytes(mb)), kp.trusted).reason == "bad_signature"


@pytest.mark.parametrize("field,value", [
    ("version", 99), ("expires", NOW + 100 * 365 * DAY), ("labels", ["dark", "bright", "mid"]),
    ("default_threshold", 0.01), ("model_name", "other"),
])
def test_manifest_field_changed_after_signing(kp: KeyPair, good: bytes, field: str, value: Any) -> None:
    doc, _ = doc_and_payload(good)
    doc[field] = value
    bad = replace_member(good, "manifest.json", M.canonical_json(doc))
    assert refused(bad, kp.trusted).reason == "bad_signature"


def test_file_hash_in_manifest_changed_to_match_a_swapped_model(kp: KeyPair, good: bytes) -> None:
    evil = b"evil model"
    doc, _ = doc_and_payload(good)
    import hashlib

    doc["files"]["model.tflite"] = {"sha256": hashlib.sha256(evil).hexdigest(), "length": len(evil)}
    bad = replace_member(replace_member(good, "manifest.json", M.canonical_json(doc)), "model.tflite", evil)
    assert refused(bad, kp.trusted).reason == "bad_signature"


def test_signature_bytes_flipped(kp: KeyPair, good: bytes) -> None:
    sig = json.loads(dict(members_of(good))["manifest.sig"])
    raw = bytearray(base64.b64decode(sig["sig"]))
    raw[10] ^= 0x04
    sig["sig"] = base64.b64encode(bytes(raw)).decode()
    assert refused(replace_member(good, "manifest.sig", M.canonical_json(sig)), kp.trusted).reason == \
        "bad_signature"


@pytest.mark.parametrize("content", [
    b"", b"not json", b"[" * 3000 + b"]" * 3000,
    b'{"alg":"rsa","key_id":"0000000000000000","sig":"AA=="}', b"[]",
    b'{"alg":"ed25519","key_id":"0000000000000000","sig":"AA=="}',
])
def test_malformed_signature_file(kp: KeyPair, good: bytes, content: bytes) -> None:
    assert refused(replace_member(good, "manifest.sig", content), kp.trusted).reason == "bad_signature"


def test_signature_file_not_canonical(kp: KeyPair, good: bytes) -> None:
    sig = json.loads(dict(members_of(good))["manifest.sig"])
    spaced = json.dumps(sig, indent=1).encode()  # same content, other bytes
    assert refused(replace_member(good, "manifest.sig", spaced), kp.trusted).reason == "bad_signature"


def test_oversized_manifest_and_signature_refused_on_every_path(kp: KeyPair, good: bytes) -> None:
    members = dict(members_of(good))
    big_manifest = members["manifest.json"] + b" " * M.MAX_MANIFEST_BYTES
    big_sig = members["manifest.sig"] + b" " * M.MAX_SIG_BYTES
    data = replace_member(good, "manifest.json", big_manifest)
    assert refused(data, kp.trusted).reason == "too_large"
    with pytest.raises(BundleError) as e:
        B.read_manifest_unverified(data)
    assert e.value.reason == "too_large"
    with pytest.raises(BundleError) as e:
        B.verify_manifest(big_manifest, members["manifest.sig"], kp.trusted)
    assert e.value.reason == "too_large"
    assert refused(replace_member(good, "manifest.sig", big_sig), kp.trusted).reason == "bad_signature"
    with pytest.raises(BundleError) as e:
        B.verify_manifest(members["manifest.json"], big_sig, kp.trusted)
    assert e.value.reason == "bad_signature" and "too large" in str(e.value)


def test_mix_and_match_files_of_two_signed_bundles(kp: KeyPair) -> None:
    a = make_bundle(b"model A" * 10, kp, version=3, created=NOW)
    b = make_bundle(b"model B" * 10, kp, version=4, created=NOW)
    mixed = replace_member(b, "model.tflite", dict(members_of(a))["model.tflite"])
    assert refused(mixed, kp.trusted).reason == "length_mismatch" or refused(mixed, kp.trusted).reason == \
        "hash_mismatch"
    a2 = make_bundle(b"model A" * 10, kp, version=3, created=NOW)
    b2 = make_bundle(b"model C" * 10, kp, version=4, created=NOW)
    mixed2 = replace_member(b2, "model.tflite", dict(members_of(a2))["model.tflite"])
    assert refused(mixed2, kp.trusted).reason == "hash_mismatch"  # same length: caught by the hash


# ---- keys ------------------------------------------------------------------------------------


def test_signed_by_an_untrusted_key(tmp_path: Path, kp: KeyPair) -> None:
    mallory = make_keypair(tmp_path, "mallory")
    e = refused(make_bundle(None, mallory, version=3, created=NOW), kp.trusted)
    assert e.reason == "untrusted_key" and mallory.key_id in str(e)


def test_untrusted_signature_claiming_a_trusted_key_id(tmp_path: Path, kp: KeyPair) -> None:
    mallory = make_keypair(tmp_path, "mallory")
    bad = make_bundle(None, mallory, version=3, created=NOW)
    sig = json.loads(dict(members_of(bad))["manifest.sig"])
    sig["key_id"] = kp.key_id
    assert refused(replace_member(bad, "manifest.sig", M.canonical_json(sig)), kp.trusted).reason == \
        "bad_signature"


def test_no_trusted_keys(good: bytes) -> None:
    assert refused(good, {}).reason == "untrusted_key"


# ---- freshness: downgrade, replay, expiry ----------------------------------------------------


def test_lower_version_is_a_downgrade(kp: KeyPair, good: bytes) -> None:
    e = refused(good, kp.trusted, installed_version=4)
    assert e.reason == "downgrade" and "v3" in str(e) and "v4" in str(e)


def test_replayed_older_bundle_after_newer_installed(kp: KeyPair) -> None:
    v1 = make_bundle(None, kp, version=1, created=NOW)
    v2 = make_bundle(None, kp, version=2, created=NOW + 10)
    installed = B.verify_bundle(v1, kp.trusted, installed_version=0, now=NOW).manifest.version
    installed = B.verify_bundle(v2, kp.trusted, installed_version=installed, now=NOW + 20).manifest.version
    assert installed == 2
    assert refused(v1, kp.trusted, installed_version=installed, now=NOW + 30).reason == "downgrade"
    assert refused(v2, kp.trusted, installed_version=installed, now=NOW + 30).reason == "same_version"


def test_expired_and_accepted_within_clock_slack(kp: KeyPair) -> None:
    # expired 10 days ago
    data = make_bundle(None, kp, version=3, created=NOW - 40 * DAY, expires_in_s=30 * DAY)
    e = refused(data, kp.trusted)
    assert e.reason == "expired"
    assert refused(data, kp.trusted, clock_slack_s=9 * DAY).reason == "expired"
    assert B.verify_bundle(data, kp.trusted, now=NOW, clock_slack_s=11 * DAY).manifest.version == 3


def test_not_yet_valid_and_accepted_within_clock_slack(kp: KeyPair) -> None:
    data = make_bundle(None, kp, version=3, created=NOW + 2 * DAY)  # device clock is behind
    assert refused(data, kp.trusted).reason == "not_yet_valid"
    assert B.verify_bundle(data, kp.trusted, now=NOW, clock_slack_s=3 * DAY).manifest.version == 3


# ---- malicious containers --------------------------------------------------------------------


def _with_member(good: bytes, hdr: bytes, content: bytes = b"") -> bytes:
    entries = [(tar_header(n, len(c)), c) for n, c in members_of(good)]
    return raw_container(entries + [(hdr, content)])


@pytest.mark.parametrize("name,what", [
    ("../evil.so", "traversal"), ("../../etc/cron.d/x", "traversal"), ("a/../../b", "traversal"),
    ("/etc/passwd", "absolute"), ("sub/model.tflite", "directory"), ("..", "traversal"),
    ("model.tflite\\..\\x", "traversal"), (".hidden", "plain file name"),
])
def test_path_traversal_and_absolute_names(kp: KeyPair, good: bytes, name: str, what: str) -> None:
    e = refused(_with_member(good, tar_header(name, 4), b"evil"), kp.trusted)
    assert e.reason == "bad_container" and what in str(e)


def test_traversal_hidden_in_the_ustar_prefix_field(kp: KeyPair, good: bytes) -> None:
    e = refused(_with_member(good, tar_header("x", 4, prefix=b".."), b"evil"), kp.trusted)
    assert e.reason == "bad_container" and "traversal" in str(e)


@pytest.mark.parametrize("typeflag,kind", [
    (b"1", "hard link"), (b"2", "symbolic link"), (b"3", "character device"), (b"4", "block device"),
    (b"5", "directory"), (b"6", "FIFO"), (b"x", "pax extended header"), (b"L", "GNU long name"),
    (b"Z", "type"),
])
def test_links_devices_and_other_non_regular_members(
    kp: KeyPair, good: bytes, typeflag: bytes, kind: str
) -> None:
    hdr = tar_header("labels2.txt", 0, typeflag=typeflag, linkname=b"/etc/shadow", devmajor=1, devminor=3)
    e = refused(_with_member(good, hdr), kp.trusted)
    assert e.reason == "bad_container" and kind in str(e)


def test_symlink_replacing_a_payload_file(kp: KeyPair, good: bytes) -> None:
    entries = []
    for n, c in members_of(good):
        if n == "model.tflite":
            entries.append((tar_header(n, 0, typeflag=b"2", linkname=b"/etc/passwd"), b""))
        else:
            entries.append((tar_header(n, len(c)), c))
    assert refused(raw_container(entries), kp.trusted).reason == "bad_container"


def test_duplicate_member_names(kp: KeyPair, good: bytes) -> None:
    members = members_of(good)
    entries = [(tar_header(n, len(c)), c) for n, c in members]
    entries.append((tar_header("model.tflite", 4), b"evil"))  # a later duplicate would win on extraction
    e = refused(raw_container(entries), kp.trusted)
    assert e.reason == "bad_container" and "duplicate" in str(e)
    dup_manifest = [entries[0]] + entries
    assert refused(raw_container(dup_manifest), kp.trusted).reason == "bad_container"


def test_file_longer_and_shorter_than_declared(kp: KeyPair, good: bytes) -> None:
    model = dict(members_of(good))["model.tflite"]
    e = refused(replace_member(good, "model.tflite", model + b"\0" * 700), kp.trusted)
    assert e.reason == "length_mismatch" and "model.tflite" in str(e)
    assert refused(replace_member(good, "model.tflite", model[:-1]), kp.trusted).reason == "length_mismatch"


def test_extra_file_not_in_the_manifest(kp: KeyPair, good: bytes) -> None:
    members = members_of(good)
    bad = rebuild(members[:2] + sorted(members[2:] + [("payload.sh", b"rm -rf /")]))
    e = refused(bad, kp.trusted)
    assert e.reason == "extra_file" and "payload.sh" in str(e)


def test_missing_file_and_missing_manifest(kp: KeyPair, good: bytes) -> None:
    members = members_of(good)
    assert refused(rebuild([m for m in members if m[0] != "labels.txt"]), kp.trusted).reason == "missing_file"
    assert refused(rebuild(members[1:]), kp.trusted).reason == "missing_manifest"
    assert refused(rebuild(members[:1] + members[2:]), kp.trusted).reason == "missing_manifest"


def test_members_out_of_canonical_order(kp: KeyPair, good: bytes) -> None:
    members = members_of(good)
    assert refused(rebuild([members[1], members[0]] + members[2:]), kp.trusted).reason == "bad_container"


def test_every_truncation_point_is_reported_as_truncated(kp: KeyPair, good: bytes) -> None:
    # covers mid-header, mid-file, mid-padding, at member boundaries and inside the end marker
    reasons = set()
    for cut in range(len(good)):
        with pytest.raises(BundleError) as e:
            B.verify_bundle(good[:cut], kp.trusted, now=NOW)
        reasons.add(e.value.reason)
        assert e.value.reason == "truncated", cut
    assert reasons == {"truncated"}


def test_oversize_bundle_refused_before_parsing(kp: KeyPair) -> None:
    e = refused(b"\xff" * 2049, kp.trusted, max_bundle_bytes=2048)  # not even a tar: size comes first
    assert e.reason == "too_large"


def test_member_larger_than_the_file_limit(kp: KeyPair) -> None:
    data = make_bundle(b"x" * 5000, kp, version=3, created=NOW)
    e = refused(data, kp.trusted, max_file_bytes=4096)
    assert e.reason == "too_large" and "model.tflite" in str(e)


def test_header_claims_a_huge_size(kp: KeyPair, good: bytes) -> None:
    bad = raw_container([(tar_header("model.tflite", 8 ** 11 - 1), b"")])
    assert refused(bad, kp.trusted).reason == "too_large"


@pytest.mark.parametrize("data", [b"PK\x03\x04" + b"\0" * 600, b"TFL3" * 300, b"\x1f\x8b" + b"\x01" * 1000])
def test_not_a_bundle(kp: KeyPair, data: bytes) -> None:
    assert refused(data, kp.trusted).reason == "not_a_bundle"


def test_tarfile_made_container_is_not_canonical(kp: KeyPair, good: bytes) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for n, c in members_of(good):
            info = tarfile.TarInfo(n)
            info.size, info.mtime = len(c), 12345
            tf.addfile(info, io.BytesIO(c))
    assert refused(buf.getvalue(), kp.trusted).reason == "bad_container"


def test_data_after_the_end_of_archive(kp: KeyPair, good: bytes) -> None:
    assert refused(good + b"\0" * 512, kp.trusted).reason == "bad_container"
    assert refused(good + b"#!/bin/sh\n", kp.trusted).reason == "bad_container"


def test_header_checksum_broken(kp: KeyPair, good: bytes) -> None:
    bad = bytearray(good)
    i = good.index(b"manifest.sig\0")  # the second member header's name field
    assert i % 512 == 0
    bad[i + 1] ^= 0x20
    assert refused(bytes(bad), kp.trusted).reason == "bad_container"


# ---- signed but invalid manifests ------------------------------------------------------------


def test_unsupported_schema_version(kp: KeyPair, good: bytes) -> None:
    doc, payload = doc_and_payload(good)
    doc["schema_version"] = 2
    e = refused(resign(kp.key, doc, payload), kp.trusted)
    assert e.reason == "unsupported_schema" and "update kestrel-edge" in str(e)


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.pop("expires"), "missing field 'expires'"),
    (lambda d: d.update(surprise=1), "unknown field 'surprise'"),
    (lambda d: d.update(version=True), "version"),
    (lambda d: d.update(version=2.0), "version"),
    (lambda d: d.update(model_name="../x"), "model_name"),
    (lambda d: d.update(expires=d["created"] - 1), "expires must be after created"),
    (lambda d: d["input"].update(dtype="int4"), "input"),
    (lambda d: d.update(default_threshold=1.5), "default_threshold"),
    (lambda d: d.update(model_file="nope.tflite"), "model_file"),
    (lambda d: d.update(labels=["a", "b", "c"]), "labels.txt does not match"),
    (lambda d: d["files"].update({"../x": {"sha256": "0" * 64, "length": 1}}), "not allowed"),
    (lambda d: d["self_test"].update(cases=[{"input": "!!", "expected": [1, 0, 0]}]), "base64"),
    (lambda d: d["self_test"].update(tolerance=-1), "tolerance"),
    # bounds: whatever is signed must fit the wire (proto uint64) and float arithmetic
    (lambda d: d.update(version=2 ** 70), "version"),
    (lambda d: d.update(version=2 ** 63), "version"),
    (lambda d: d.update(created=10 ** 400), "unix times"),
    (lambda d: d.update(expires=10 ** 400), "unix times"),
    (lambda d: d.update(model_name="brightness\n"), "model_name"),  # "$" matched before a trailing newline
    (lambda d: d["files"].update({"x\n": {"sha256": "0" * 64, "length": 1}}), "not allowed"),
    (lambda d: d["files"].update({"slot.json": {"sha256": "0" * 64, "length": 1}}), "not allowed"),
    (lambda d: d["files"].update({"bundle.kbundle": {"sha256": "0" * 64, "length": 1}}), "not allowed"),
    (lambda d: d["files"]["labels.txt"].update(length=2 ** 70), "length"),
    (lambda d: d["input"].update(shape=[1, True, 2.0, 3]), "input.shape"),
    (lambda d: d["input"].update(shape=[1, 10 ** 6, 10 ** 6, 3]), "input.shape"),
    (lambda d: d["input"].update(zero_point=False), "zero_point"),
    (lambda d: d["self_test"].update(latency_budget_ms=10 ** 400), "latency_budget_ms"),
    (lambda d: d["self_test"].update(cases=[{"input": base64.b64encode(bytes(64 * 64 * 3)).decode(),
                                             "expected": [10 ** 400, 0, 0]}]), "expected"),
    (lambda d: d.update(metrics={"n": 2 ** 64}), "metrics"),
    (lambda d: d.update(labels=["x" * 300, "dark", "mid"]), "labels"),
])
def test_signed_manifest_with_schema_errors(kp: KeyPair, good: bytes, mutate: Any, needle: str) -> None:
    doc, payload = doc_and_payload(good)
    mutate(doc)
    e = refused(resign(kp.key, doc, payload), kp.trusted)
    assert e.reason == "bad_manifest" and needle in str(e)


def test_signed_but_non_canonical_manifest(kp: KeyPair, good: bytes) -> None:
    doc, payload = doc_and_payload(good)
    pretty = json.dumps(doc, indent=2).encode()
    e = refused(resign(kp.key, doc, payload, manifest_bytes=pretty), kp.trusted)
    assert e.reason == "bad_manifest" and "canonical" in str(e)


def test_signed_manifest_with_duplicate_keys(kp: KeyPair, good: bytes) -> None:
    doc, payload = doc_and_payload(good)
    mb = M.canonical_json(doc)
    dup = mb[:-1] + b',"version":999}'
    e = refused(resign(kp.key, doc, payload, manifest_bytes=dup), kp.trusted)
    assert e.reason == "bad_manifest"


def test_zero_padding_after_a_member_must_be_zero(kp: KeyPair, good: bytes) -> None:
    members = members_of(good)
    model_end = good.index(b"TFL3-not-really") + len(dict(members)["model.tflite"])
    assert model_end % 512 != 0
    bad = bytearray(good)
    bad[model_end] = 0x41  # hide a byte in the padding: nothing may be carried outside the members
    e = refused(bytes(bad), kp.trusted)
    assert e.reason == "bad_container" and "canonical" in str(e)


def test_helper_headers_are_canonical(good: bytes) -> None:
    entries = [(tar_header(n, len(c)), c) for n, c in members_of(good)]
    assert raw_container(entries) == good  # so the attack tests above differ only in what they attack


@pytest.mark.parametrize("raw", [
    b'{"schema_version":1,"input":{"shape":[1e400]}}', b'{"schema_version":1,"created":1e999}',
    b'{"schema_version":1,"input":{"shape":"abc"}}', b"\xff\xfe", b'{"schema_version":true}',
])
def test_unverified_manifest_reader_refuses_cleanly(kp: KeyPair, good: bytes, raw: bytes) -> None:
    bad = replace_member(good, "manifest.json", raw)
    with pytest.raises(BundleError) as e:
        B.read_manifest_unverified(bad)
    assert e.value.reason == "bad_manifest"


def test_unverified_reader_raises_only_bundle_error_on_huge_numbers(kp: KeyPair, good: bytes) -> None:
    doc, payload = doc_and_payload(good)
    doc["created"] = 10 ** 400  # used to raise OverflowError from float()
    with pytest.raises(BundleError) as e:
        B.read_manifest_unverified(resign(kp.key, doc, payload))
    assert e.value.reason == "bad_manifest"


def test_payload_name_with_trailing_newline_is_not_a_plain_name(kp: KeyPair, good: bytes) -> None:
    members = members_of(good)
    ents = [(tar_header(n, len(c)), c) for n, c in members] + [(tar_header(b"x\n", 1), b"x")]
    assert refused(raw_container(ents), kp.trusted).reason == "bad_container"


def test_expected_model_and_version_floor(kp: KeyPair) -> None:
    v3 = make_bundle(None, kp, version=3, created=NOW)
    e = refused(v3, kp.trusted, expected_model="other")
    assert e.reason == "wrong_model" and "'brightness'" in str(e)
    assert B.verify_bundle(v3, kp.trusted, now=NOW, expected_model="brightness").manifest.version == 3
    # installed v2, but v3 ran before and was rolled back: the floor refuses the replay
    e = refused(v3, kp.trusted, installed_version=2, version_floor=3)
    assert e.reason == "downgrade" and "highest version" in str(e)
    assert refused(v3, kp.trusted, installed_version=3, version_floor=3).reason == "same_version"
    assert B.verify_bundle(v3, kp.trusted, now=NOW, installed_version=1, version_floor=2).manifest.version == 3


def test_unset_clock_skips_not_yet_valid_but_still_judges_expiry(kp: KeyPair) -> None:
    future = make_bundle(None, kp, version=3, created=NOW + 10 * DAY, expires_in_s=30 * DAY)
    assert refused(future, kp.trusted).reason == "not_yet_valid"
    assert B.verify_bundle(future, kp.trusted, now=NOW, clock_set=False).manifest.version == 3
    assert refused(future, kp.trusted, now=NOW + 50 * DAY, clock_set=False).reason == "expired"


def test_verify_manifest_rechecks_a_slot_against_todays_keys(tmp_path: Path, kp: KeyPair) -> None:
    members = dict(members_of(make_bundle(None, kp, version=3, created=NOW)))
    m, kid = B.verify_manifest(members["manifest.json"], members["manifest.sig"], kp.trusted,
                               expected_model="brightness")
    assert (m.version, kid) == (3, kp.key_id)
    other = make_keypair(tmp_path, name="rotated")
    with pytest.raises(BundleError) as e:
        B.verify_manifest(members["manifest.json"], members["manifest.sig"], other.trusted)
    assert e.value.reason == "untrusted_key"
