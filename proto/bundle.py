"""The signed model bundle: build it (trainer), verify it (device, hub), stage its files (updater).

A bundle is one uncompressed POSIX (ustar) tar file, ``*.kbundle``, in canonical form::

    manifest.json   canonical JSON (UTF-8, sorted keys, no whitespace): what the bundle is
    manifest.sig    {"alg": "ed25519", "key_id": "...", "sig": "<base64>"} over
                    b"kestrel-bundle-v1\\n" + manifest.json bytes
    labels.txt      payload files, sorted by name, each listed in the manifest with
    model.tflite    sha256 and length

``verify_bundle`` is pure (bytes in, verdict out: no IO, no clock reads) and checks, in order:
size limits; the container headers in memory (types, names, sizes, canonical layout: nothing is
extracted); the signature over the manifest bytes with a trusted key; the manifest schema (every
number bounded); every file's presence, length and hash; the model name the caller expects;
expiry; the version against the installed one and the caller's version floor. It raises only
``BundleError`` whose ``reason`` is one of ``REASONS``. ``verify_manifest`` is the signature and
schema part alone: the updater re-checks an installed slot with it (edge.updater.slots.SlotStore.check:
signature against today's trusted keys, then the files; no model-name, time or version rule).
The container is proto.bundle_container; the manifest's names, bounds and schema are proto.manifest.
Full format: docs/bundle-format.md.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from cryptography.exceptions import InvalidSignature

from proto import atomic
from proto import keys as keymod
from proto.bundle_container import parse_container, write_container
from proto.errors import BundleError
from proto.inputspec import InputSpec
from proto.manifest import (
    _NAME_RE,
    LABELS_FILE,
    MANIFEST_NAME,
    MAX_BUNDLE_BYTES,
    MAX_FILE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_SIG_BYTES,
    MAX_TIME_S,
    MAX_VERSION,
    MODEL_FILE,
    RESERVED,
    RESERVED_PAYLOAD,
    SCHEMA_VERSION,
    SIG_NAME,
    Manifest,
    _bad,
    _full,
    _strict_json,
    canonical_json,
    parse_manifest,
    refuse,
)
from proto.modelname import valid_model_name

# The public names; the last group are re-exported from proto.manifest and proto.modelname for the
# callers that import them from proto.bundle (edge.updater.engine, trainer.config).
__all__ = [
    "DOMAIN", "EXTENSION", "VerifiedBundle", "labels_text", "build_bundle", "verify_manifest", "verify_bundle",
    "read_manifest_unverified", "write_staged", "read_bounded",
    "MANIFEST_NAME", "MAX_MANIFEST_BYTES", "MAX_TIME_S", "MAX_VERSION", "refuse", "valid_model_name",
]

DOMAIN = b"kestrel-bundle-v1\n"
EXTENSION = ".kbundle"
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")


@dataclasses.dataclass(frozen=True)
class VerifiedBundle:
    manifest: Manifest
    files: Dict[str, memoryview]  # payload files by name (not manifest.json / manifest.sig): views, no copies
    key_id: str
    bundle_sha256: str
    manifest_bytes: bytes
    sig_bytes: bytes

    @property
    def model_view(self) -> memoryview:
        """The model file's bytes without a copy (a view into the bundle bytes)."""
        return self.files[self.manifest.model_file]

    @property
    def model_bytes(self) -> bytes:
        """A copy of the model file's bytes (for runtimes that want ``bytes``)."""
        return bytes(self.files[self.manifest.model_file])

    @property
    def labels(self) -> List[str]:
        return list(self.manifest.labels)


def labels_text(labels: List[str]) -> bytes:
    return ("\n".join(labels) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------------------------
# Build


def build_bundle(
    *,
    model_bytes: bytes,
    labels: List[str],
    model_name: str,
    version: int,
    input_spec: InputSpec,
    signing_key: keymod.SigningKey,
    default_threshold: float = 0.6,
    metrics: Optional[Dict[str, Any]] = None,
    self_test: Optional[Dict[str, Any]] = None,
    expires_in_s: float = 365 * 86400,
    created: Optional[float] = None,
    extra_files: Optional[Dict[str, bytes]] = None,
) -> bytes:
    """Sign and pack a bundle. ``self_test`` is ``{tolerance, cases: [{input: base64 | bytes,
    expected}], latency_budget_ms}`` (None = no cases). Raises BundleError(bad_manifest) on bad input."""
    now = time.time() if created is None else float(created)
    created_v: Any = int(now) if float(now).is_integer() else now
    expires_f = now + float(expires_in_s)
    expires_v: Any = int(expires_f) if float(expires_f).is_integer() else expires_f
    st: Dict[str, Any] = dict(self_test) if self_test is not None else {}
    st.setdefault("tolerance", 0.05)
    st.setdefault("latency_budget_ms", None)
    st.setdefault("cases", [])
    st["cases"] = [
        {"input": base64.b64encode(c["input"]).decode("ascii") if isinstance(c["input"], (bytes, bytearray))
         else c["input"], "expected": [float(x) for x in c["expected"]]}
        for c in st["cases"]
    ]
    payload: Dict[str, bytes] = {MODEL_FILE: bytes(model_bytes), LABELS_FILE: labels_text(list(labels))}
    for k, v in (extra_files or {}).items():
        if k in payload or k in RESERVED_PAYLOAD:
            raise _bad(f"extra file {k!r} clashes with a bundle file")
        payload[k] = bytes(v)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "model_name": model_name,
        "version": version,
        "created": created_v,
        "expires": expires_v,
        "files": {k: {"sha256": hashlib.sha256(v).hexdigest(), "length": len(v)} for k, v in payload.items()},
        "input": input_spec.to_dict(),
        "labels": list(labels),
        "default_threshold": default_threshold,
        "metrics": dict(metrics or {}),
        "self_test": st,
        "model_file": MODEL_FILE,
    }
    try:
        manifest_bytes = canonical_json(doc)
    except (TypeError, ValueError) as exc:
        raise _bad(f"manifest is not JSON-serializable: {exc}") from exc
    parse_manifest(_strict_json(manifest_bytes))  # the builder never emits what the verifier refuses
    kid, sig = keymod.sign(signing_key, DOMAIN + manifest_bytes)
    sig_doc = {"alg": keymod.ALG, "key_id": kid, "sig": base64.b64encode(sig).decode("ascii")}
    sig_bytes = canonical_json(sig_doc)
    members = [(MANIFEST_NAME, manifest_bytes), (SIG_NAME, sig_bytes)] + sorted(payload.items())
    return write_container(members)


# ----------------------------------------------------------------------------------------------
# Verify


def _split(members: List[Tuple[str, memoryview]]) -> Tuple[bytes, bytes, Dict[str, memoryview]]:
    names = [m[0] for m in members]
    if MANIFEST_NAME not in names:
        raise refuse("missing_manifest", f"no {MANIFEST_NAME} in the bundle")
    if SIG_NAME not in names:
        raise refuse("missing_manifest", f"no {SIG_NAME} in the bundle (unsigned)")
    if names[:2] != [MANIFEST_NAME, SIG_NAME] or names[2:] != sorted(names[2:]):
        raise refuse("bad_container", "members are not in canonical order")
    d = dict(members)
    payload = {k: v for k, v in d.items() if k not in RESERVED}
    return bytes(d[MANIFEST_NAME]), bytes(d[SIG_NAME]), payload  # sizes: _signed_manifest, _parse_sig


def _check_manifest_size(manifest_bytes: bytes) -> None:
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise refuse("too_large", f"{MANIFEST_NAME} is {len(manifest_bytes)} bytes "
                                  f"(limit {MAX_MANIFEST_BYTES})")


def _parse_sig(sig_bytes: bytes) -> Tuple[str, bytes]:
    if len(sig_bytes) > MAX_SIG_BYTES:
        raise refuse("bad_signature", f"{SIG_NAME} is too large")
    try:
        doc = _strict_json(sig_bytes)
    except (ValueError, RecursionError):
        raise refuse("bad_signature", f"{SIG_NAME} is not valid JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"alg", "key_id", "sig"}:
        raise refuse("bad_signature", f"{SIG_NAME} must be {{alg, key_id, sig}}")
    if doc["alg"] != keymod.ALG:
        raise refuse("bad_signature", f"unsupported signature algorithm {doc['alg']!r}")
    kid = doc["key_id"]
    if not _full(_KEY_ID_RE, kid) or not isinstance(doc["sig"], str):
        raise refuse("bad_signature", f"{SIG_NAME} has a malformed key_id or sig")
    try:
        sig = base64.b64decode(doc["sig"].encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise refuse("bad_signature", "signature is not base64") from None
    if len(sig) != 64:
        raise refuse("bad_signature", f"signature is {len(sig)} bytes, Ed25519 needs 64")
    try:
        canonical = canonical_json(doc)
    except (ValueError, UnicodeEncodeError):
        raise refuse("bad_signature", f"{SIG_NAME} is not canonical JSON") from None
    if canonical != sig_bytes or base64.b64encode(sig).decode("ascii") != doc["sig"]:
        raise refuse("bad_signature", f"{SIG_NAME} is not in canonical form")
    return kid, sig


def _signed_manifest(
    manifest_bytes: bytes, sig_bytes: bytes, trusted_keys: Mapping[str, keymod.PublicKey]
) -> Tuple[Dict[str, Any], str]:
    _check_manifest_size(manifest_bytes)
    kid, sig = _parse_sig(sig_bytes)
    pub = trusted_keys.get(kid)
    if pub is None:
        raise refuse("untrusted_key", f"signed by key {kid}, which is not in the trusted keys "
                                      f"({', '.join(sorted(trusted_keys)) or 'none'})")
    try:
        pub.verify(sig, DOMAIN + manifest_bytes)
    except InvalidSignature:
        raise refuse("bad_signature", f"the manifest signature does not verify with key {kid}") from None
    # Signed: from here the manifest bytes are the signer's. Still check they are well-formed.
    try:
        doc = _strict_json(manifest_bytes)
    except (ValueError, RecursionError):
        raise _bad(f"{MANIFEST_NAME} is not strict UTF-8 JSON") from None
    try:
        canonical = canonical_json(doc)
    except (ValueError, UnicodeEncodeError, RecursionError):
        raise _bad(f"{MANIFEST_NAME} cannot be canonicalized") from None
    if canonical != manifest_bytes:
        raise _bad(f"{MANIFEST_NAME} is not canonical JSON")
    return doc, kid


def _check_files(m: Manifest, payload: Mapping[str, Any]) -> None:
    for fname in sorted(m.files):
        if fname not in payload:
            raise refuse("missing_file", f"{fname!r} is listed in the manifest but not in the bundle")
    for fname in sorted(payload):
        if fname not in m.files:
            raise refuse("extra_file", f"{fname!r} is in the bundle but not in the signed manifest")
    for fname in sorted(m.files):
        ent, data = m.files[fname], payload[fname]
        if len(data) != ent.length:
            raise refuse("length_mismatch", f"{fname!r} is {len(data)} bytes, the manifest says {ent.length}")
        if hashlib.sha256(data).hexdigest() != ent.sha256:
            raise refuse("hash_mismatch", f"{fname!r} does not match its sha256 in the manifest")
    if bytes(payload[LABELS_FILE]) != labels_text(m.labels):
        raise _bad(f"{LABELS_FILE} does not match the manifest labels")


def _check_model(m: Manifest, expected_model: Optional[str]) -> None:
    if expected_model is not None and m.model_name != expected_model:
        raise refuse("wrong_model", f"the bundle is model {m.model_name!r} v{m.version}; this device runs "
                                    f"{expected_model!r} (a different model is installed only on purpose: "
                                    "see docs/updates.md)")


def verify_manifest(
    manifest_bytes: bytes, sig_bytes: bytes, trusted_keys: Mapping[str, keymod.PublicKey],
    *, expected_model: Optional[str] = None,
) -> Tuple[Manifest, str]:
    """The signed manifest alone: signature with a trusted key, schema, model name. Pure.

    Used to re-check an installed slot (its manifest.json and manifest.sig) against today's trusted
    keys; the caller then hashes the slot's files against ``Manifest.files``.
    """
    doc, kid = _signed_manifest(bytes(manifest_bytes), bytes(sig_bytes), trusted_keys)
    m = parse_manifest(doc)
    _check_model(m, expected_model)
    return m, kid


def verify_bundle(
    data: Any,
    trusted_keys: Mapping[str, keymod.PublicKey],
    *,
    installed_version: int = 0,
    version_floor: int = 0,
    expected_model: Optional[str] = None,
    now: float,
    clock_slack_s: float = 0.0,
    clock_set: bool = True,
    max_bundle_bytes: int = MAX_BUNDLE_BYTES,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> VerifiedBundle:
    """Verify a bundle completely. Pure: no IO, no clock (pass ``now``). Raises only BundleError.

    ``expected_model``: the model name the caller runs (None = any: a first install). Version rule:
    equal to ``installed_version`` is ``same_version`` (nothing to do); at or below
    ``max(installed_version, version_floor)`` is ``downgrade``. ``version_floor`` is the caller's
    persisted high-water mark for this model (never lowered by a rollback), so a bundle that was
    installed and rolled back, or any older one, cannot be replayed. Time: ``expired`` when ``now``
    is past ``expires + clock_slack_s``; ``not_yet_valid`` when ``now + clock_slack_s`` is before
    ``created``, judged only when ``clock_set`` (a caller whose clock is known to be unset, e.g. a
    device without a real-time clock before NTP, passes its persisted time floor as ``now`` and
    ``clock_set=False``: see docs/threat-model.md).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise refuse("not_a_bundle", f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bundle_bytes:
        raise refuse("too_large", f"{len(data)} bytes (limit {max_bundle_bytes})")
    view = memoryview(data).cast("B")
    members = parse_container(view, max_file_bytes=max_file_bytes)
    manifest_bytes, sig_bytes, payload = _split(members)
    doc, kid = _signed_manifest(manifest_bytes, sig_bytes, trusted_keys)
    m = parse_manifest(doc)
    _check_files(m, payload)
    _check_model(m, expected_model)
    if now > m.expires + clock_slack_s:
        raise refuse("expired", f"{m.model_name} v{m.version} expired at {_iso(m.expires)} "
                                f"(now {_iso(now)}); ask for a freshly signed bundle")
    if clock_set and now + clock_slack_s < m.created:
        raise refuse("not_yet_valid", f"{m.model_name} v{m.version} was created at {_iso(m.created)}, after "
                                      f"now ({_iso(now)}); check the device clock")
    if m.version == installed_version:
        raise refuse("same_version", f"{m.model_name} v{m.version} is already installed (nothing to do)")
    floor = max(int(installed_version), int(version_floor))
    if m.version <= floor:
        why = (f"older than installed v{installed_version}" if m.version < installed_version else
               f"at or below v{floor}, the highest version this device has run (a rolled-back or "
               "older bundle is never installed again)")
        raise refuse("downgrade", f"{m.model_name} v{m.version} is {why}")
    return VerifiedBundle(
        manifest=m, files=payload, key_id=kid, bundle_sha256=hashlib.sha256(view).hexdigest(),
        manifest_bytes=manifest_bytes, sig_bytes=sig_bytes,
    )


def _iso(t: float) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
    except (OverflowError, OSError, ValueError):
        return f"{t:.0f}s"


def read_manifest_unverified(data: Any) -> Manifest:
    """The manifest WITHOUT checking the signature or files: for display only, never for decisions."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise refuse("not_a_bundle", f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_BUNDLE_BYTES:
        raise refuse("too_large", f"{len(data)} bytes (limit {MAX_BUNDLE_BYTES})")
    manifest_bytes, _sig, _payload = _split(parse_container(data))
    _check_manifest_size(manifest_bytes)
    try:
        doc = _strict_json(manifest_bytes)
    except (ValueError, RecursionError):
        raise _bad(f"{MANIFEST_NAME} is not strict UTF-8 JSON") from None
    return parse_manifest(doc)


# ----------------------------------------------------------------------------------------------
# Staging (the thin IO layer)


def write_staged(verified: VerifiedBundle, staging_dir: Path) -> None:
    """Write the verified payload files plus manifest.json and manifest.sig into ``staging_dir``.

    Names were checked to be plain file names; they are checked again here so nothing can land
    outside ``staging_dir``. Each file is written atomically (temp, replace) but NOT fsynced: the
    caller fsyncs the whole staging directory once (proto.atomic.fsync_tree) before it is used.
    """
    staging = Path(staging_dir)
    staging.mkdir(parents=True, exist_ok=True)
    out: Dict[str, Any] = dict(verified.files)
    for name in out:
        if name in RESERVED_PAYLOAD:
            raise refuse("bad_container", f"refusing to stage a payload file named {name!r}")
    out[MANIFEST_NAME] = verified.manifest_bytes
    out[SIG_NAME] = verified.sig_bytes
    for name in sorted(out):
        if not _full(_NAME_RE, name) or os.path.basename(name) != name:
            raise refuse("bad_container", f"refusing to stage file name {name!r}")
        atomic.write_bytes(staging / name, out[name], fsync=False)  # a view: no copy


def read_bounded(path: Any, limit: int) -> bytes:
    """The bytes of bundle file ``path``, refused as ``too_large`` (before reading) when it is over
    ``limit`` bytes, and never reading more than ``limit + 1`` bytes even if it grows meanwhile."""
    p = Path(path)
    try:
        size = os.stat(str(p)).st_size
        if size > limit:
            raise refuse("too_large", f"{p} is {size} bytes (limit {limit})")
        with open(str(p), "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise BundleError(f"bundle refused: not_a_bundle: cannot read {p}: {exc.strerror or exc}",
                          reason="not_a_bundle") from exc
    if len(data) > limit:
        raise refuse("too_large", f"{p} grew over the limit of {limit} bytes while being read")
    return data
