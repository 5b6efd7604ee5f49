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
Full format: docs/bundle-format.md.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from cryptography.exceptions import InvalidSignature

from edge import atomic
from edge import keys as keymod
from edge.errors import BundleError
from edge.inputspec import InputSpec
from edge.modelname import valid_model_name

SCHEMA_VERSION = 1
DOMAIN = b"kestrel-bundle-v1\n"
MANIFEST_NAME = "manifest.json"
SIG_NAME = "manifest.sig"
MODEL_FILE = "model.tflite"
LABELS_FILE = "labels.txt"
RESERVED = (MANIFEST_NAME, SIG_NAME)
# Names the updater's slot layout uses next to the payload files (edge.updater.slots): never payload.
SLOT_RECORD_NAME = "slot.json"
SLOT_BUNDLE_NAME = "bundle.kbundle"
RESERVED_PAYLOAD = RESERVED + (SLOT_RECORD_NAME, SLOT_BUNDLE_NAME)
EXTENSION = ".kbundle"

MiB = 1024 * 1024
MAX_BUNDLE_BYTES = 200 * MiB
MAX_FILE_BYTES = 200 * MiB
MAX_MANIFEST_BYTES = 16 * MiB
MAX_SIG_BYTES = 4096
MAX_MEMBERS = 64
# Bounds of the manifest's numbers: whatever is signed must fit the wire (proto uint64/int64) and
# float arithmetic, so no later consumer can overflow on it.
MAX_VERSION = 2 ** 63 - 1
MAX_TIME_S = 253402300799  # 9999-12-31T23:59:59Z
MAX_LATENCY_BUDGET_MS = 3600 * 1000.0
MAX_INPUT_SIDE = 8192
MAX_SCORE = 1e6  # self-test expected scores (probabilities or logits)
MAX_METRIC_INT = 2 ** 63 - 1
MAX_LABELS = 65536
MAX_LABEL_CHARS = 256
MAX_SELF_TEST_CASES = 256
MAX_ZERO_POINT = 255

REASONS = (
    "too_large", "truncated", "not_a_bundle", "bad_container", "missing_manifest", "bad_manifest",
    "untrusted_key", "bad_signature", "hash_mismatch", "length_mismatch", "missing_file", "extra_file",
    "expired", "not_yet_valid", "same_version", "downgrade", "unsupported_schema", "wrong_model",
)

BLOCK = 512
# fullmatch with \Z semantics: "$" would also match before a trailing newline ("name\n").
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")


def _full(rx: re.Pattern[str], value: Any) -> bool:
    return isinstance(value, str) and rx.fullmatch(value) is not None


_DTYPE_SIZE = {"float32": 4, "uint8": 1, "int8": 1}
_MANIFEST_KEYS = {
    "schema_version", "model_name", "version", "created", "expires", "files", "input", "labels",
    "default_threshold", "metrics", "self_test", "model_file",
}
_SELF_TEST_KEYS = {"tolerance", "cases", "latency_budget_ms"}


def refuse(reason: str, detail: str) -> BundleError:
    """The one error verification raises: ``bundle refused: <reason>: <detail>``."""
    assert reason in REASONS, reason
    return BundleError(f"bundle refused: {reason}: {detail}", reason=reason)


# ----------------------------------------------------------------------------------------------
# Typed manifest


@dataclasses.dataclass(frozen=True)
class FileEntry:
    sha256: str
    length: int


@dataclasses.dataclass(frozen=True)
class SelfTestCase:
    input: bytes  # raw input tensor bytes (already preprocessed: the model's dtype and shape)
    expected: List[float]


@dataclasses.dataclass(frozen=True)
class SelfTest:
    tolerance: float
    cases: List[SelfTestCase]
    latency_budget_ms: Optional[float]


@dataclasses.dataclass(frozen=True)
class Manifest:
    schema_version: int
    model_name: str
    version: int
    created: float
    expires: float
    files: Dict[str, FileEntry]
    input_spec: InputSpec
    labels: List[str]
    default_threshold: float
    metrics: Dict[str, Any]
    self_test: SelfTest
    model_file: str
    raw: Dict[str, Any]  # the decoded JSON, for display


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


# ----------------------------------------------------------------------------------------------
# Canonical JSON


def canonical_json(obj: Any) -> bytes:
    """UTF-8 JSON, sorted keys, no insignificant whitespace, no NaN/Infinity."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def _no_dup_object(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    d: Dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    v = float(text)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return v


def _strict_json(data: bytes) -> Any:
    text = data.decode("utf-8")  # UnicodeDecodeError is a ValueError
    return json.loads(text, object_pairs_hook=_no_dup_object, parse_constant=_reject_constant,
                      parse_float=_finite_float)


# ----------------------------------------------------------------------------------------------
# Container: a strict, canonical ustar subset, parsed in memory


def _octal(value: int, width: int) -> bytes:
    s = b"%0*o" % (width - 1, value)
    if len(s) != width - 1:
        raise ValueError(f"value {value} does not fit a {width}-byte tar field")
    return s + b"\0"


def _header(name: str, size: int) -> bytes:
    raw_name = name.encode("ascii")
    if len(raw_name) > 100:
        raise ValueError(f"member name too long: {name!r}")
    h = bytearray(BLOCK)
    h[0:len(raw_name)] = raw_name
    h[100:108] = _octal(0o644, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(0, 12)
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _pad(n: int) -> int:
    return (-n) % BLOCK


def write_container(members: List[Tuple[str, bytes]]) -> bytes:
    """Canonical container bytes for ``members`` in the given order (callers fix the order)."""
    out = bytearray()
    for name, data in members:
        out += _header(name, len(data))
        out += data
        out += b"\0" * _pad(len(data))
    out += b"\0" * (2 * BLOCK)
    return bytes(out)


_TYPE_NAMES = {
    b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device",
    b"5": "directory", b"6": "FIFO", b"7": "contiguous file", b"x": "pax extended header",
    b"g": "pax global header", b"L": "GNU long name", b"K": "GNU long link name",
}


def _parse_octal(field: bytes, what: str) -> int:
    s = field.rstrip(b"\0 ").lstrip(b" ")
    if not s or any(c not in b"01234567" for c in s):
        raise refuse("bad_container", f"member header {what} field is not octal")
    return int(s, 8)


def _check_name(name_field: bytes, prefix_field: bytes) -> str:
    raw = name_field.split(b"\0", 1)[0]
    prefix = prefix_field.split(b"\0", 1)[0]
    if prefix:
        raw = prefix + b"/" + raw
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise refuse("bad_container", f"member name {raw!r} is not ASCII") from None
    if name.startswith("/"):
        raise refuse("bad_container", f"member {name!r} has an absolute path")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise refuse("bad_container", f"member {name!r} has a path traversal ('..')")
    if len(parts) > 1:
        raise refuse("bad_container", f"member {name!r} is inside a directory; bundles are flat")
    if not _full(_NAME_RE, name):
        raise refuse("bad_container", f"member name {name!r} is not a plain file name")
    return name


def parse_container(data: Any, max_file_bytes: int = MAX_FILE_BYTES) -> List[Tuple[str, memoryview]]:
    """Members (name, content view) of a canonical bundle container, read in memory without copying
    the contents; refuses anything else. ``data`` is bytes, bytearray or a memoryview."""
    data = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    if len(data) < BLOCK:
        if len(data) >= 263 and bytes(data[257:263]) != b"ustar\0":
            raise refuse("not_a_bundle", "not a Kestrel bundle (no tar header)")
        raise refuse("truncated", f"only {len(data)} bytes: the download was cut short")
    if bytes(data[257:263]) != b"ustar\0" and any(bytes(data[:BLOCK])):
        raise refuse("not_a_bundle", "not a Kestrel bundle (no ustar tar header)")
    members: List[Tuple[str, memoryview]] = []
    seen = set()
    pos = 0
    n = len(data)
    while True:
        if pos + BLOCK > n:
            raise refuse("truncated", f"archive ends inside a member header at byte {n}")
        hdr = bytes(data[pos:pos + BLOCK])
        if not any(hdr):
            if pos + 2 * BLOCK > n:
                raise refuse("truncated", "archive ends inside the end-of-archive marker")
            if any(bytes(data[pos + BLOCK:pos + 2 * BLOCK])):
                raise refuse("bad_container", "a single zero block inside the archive")
            if pos + 2 * BLOCK != n:
                raise refuse("bad_container", f"{n - pos - 2 * BLOCK} bytes after the end of the archive")
            break
        if len(members) >= MAX_MEMBERS:
            raise refuse("bad_container", f"more than {MAX_MEMBERS} members")
        stored_sum = _parse_octal(hdr[148:156], "checksum")
        computed = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
        if stored_sum != computed:
            raise refuse("bad_container", f"member header at byte {pos} has a bad checksum")
        if hdr[257:263] != b"ustar\0" or hdr[263:265] != b"00":
            raise refuse("bad_container", f"member header at byte {pos} is not POSIX ustar")
        typeflag = hdr[156:157]
        if typeflag not in (b"0", b"\0"):
            kind = _TYPE_NAMES.get(typeflag, f"type {typeflag!r}")
            raw_name = hdr[:100].split(b"\0", 1)[0]
            raise refuse("bad_container", f"member {raw_name!r} is a {kind}, not a regular file")
        name = _check_name(hdr[0:100], hdr[345:500])
        if name in seen:
            raise refuse("bad_container", f"duplicate member name {name!r}")
        seen.add(name)
        size = _parse_octal(hdr[124:136], "size")
        if size > max_file_bytes:
            raise refuse("too_large", f"member {name!r} is {size} bytes (limit {max_file_bytes})")
        start = pos + BLOCK
        end = start + size
        if end + _pad(size) > n:
            raise refuse("truncated", f"archive ends inside member {name!r}")
        # Canonical form: exactly the header and zero padding build_bundle writes, so no two
        # different byte strings carry the same members (and no ignored field hides data).
        try:
            canonical = _header(name, size)
        except ValueError:
            raise refuse("bad_container", f"member {name!r} has an out-of-range size") from None
        if hdr != canonical or any(bytes(data[end:end + _pad(size)])):
            raise refuse("bad_container", f"member {name!r} is not in canonical form "
                                          "(header or padding altered)")
        members.append((name, data[start:end]))
        pos = end + _pad(size)
    return members


# ----------------------------------------------------------------------------------------------
# Manifest schema


def _bad(detail: str) -> BundleError:
    return refuse("bad_manifest", detail)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


def _in(v: Any, lo: float, hi: float) -> bool:
    """A number (never a bool) within [lo, hi]; compares exactly, so 10**400 is simply out of range."""
    return _is_num(v) and lo <= v <= hi


def _check_input_doc(d: Dict[str, Any]) -> None:
    """The input spec's JSON types, strictly (True is not 1, 2.0 is not 2) and bounded."""
    shape = d.get("shape")
    if (not isinstance(shape, list) or len(shape) != 4
            or not all(_is_int(x) and 1 <= x <= MAX_INPUT_SIDE for x in shape)):
        raise _bad(f"input.shape must be 4 integers within 1..{MAX_INPUT_SIDE}")
    if not _in(d.get("scale"), 0.0, 1e6):
        raise _bad("input.scale must be a number within 0..1e6")
    zp = d.get("zero_point")
    if not isinstance(zp, int) or isinstance(zp, bool) or not -128 <= zp <= MAX_ZERO_POINT:
        raise _bad("input.zero_point must be an integer within -128..255")
    for k in ("dtype", "color_order", "normalization", "resize"):
        if not isinstance(d.get(k), str):
            raise _bad(f"input.{k} must be a string")


def _check_metrics(v: Any, depth: int = 0) -> None:
    """Metrics are free-form, but every number in them is bounded and nesting is shallow."""
    if depth > 8:
        raise _bad("metrics are nested too deeply (limit 8)")
    if isinstance(v, dict):
        for x in v.values():
            _check_metrics(x, depth + 1)
    elif isinstance(v, list):
        for x in v:
            _check_metrics(x, depth + 1)
    elif _is_int(v) and not -MAX_METRIC_INT <= v <= MAX_METRIC_INT:
        raise _bad("metrics hold an integer out of the 64-bit range")


def _parse_self_test(st: Any, spec: InputSpec, n_labels: int) -> SelfTest:
    if not isinstance(st, dict):
        raise _bad("self_test must be an object")
    if set(st) != _SELF_TEST_KEYS:
        raise _bad(f"self_test keys must be {sorted(_SELF_TEST_KEYS)}, got {sorted(st)}")
    tol = st["tolerance"]
    if not _in(tol, 0, 1):
        raise _bad("self_test.tolerance must be a number within 0..1")
    budget = st["latency_budget_ms"]
    if budget is not None and (not _in(budget, 0, MAX_LATENCY_BUDGET_MS) or budget <= 0):
        raise _bad(f"self_test.latency_budget_ms must be a number within 0..{MAX_LATENCY_BUDGET_MS:.0f} "
                   "(exclusive of 0) or null")
    if not isinstance(st["cases"], list) or len(st["cases"]) > MAX_SELF_TEST_CASES:
        raise _bad(f"self_test.cases must be a list of at most {MAX_SELF_TEST_CASES}")
    want = _DTYPE_SIZE[spec.dtype]
    for d in spec.shape:
        want *= d
    cases: List[SelfTestCase] = []
    for i, c in enumerate(st["cases"]):
        if not isinstance(c, dict) or set(c) != {"input", "expected"}:
            raise _bad(f"self_test.cases[{i}] must be {{input, expected}}")
        if not isinstance(c["input"], str):
            raise _bad(f"self_test.cases[{i}].input must be base64 text")
        try:
            raw = base64.b64decode(c["input"].encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise _bad(f"self_test.cases[{i}].input is not valid base64") from None
        if len(raw) != want:
            raise _bad(f"self_test.cases[{i}].input is {len(raw)} bytes, the input spec needs {want}")
        exp = c["expected"]
        if not isinstance(exp, list) or len(exp) != n_labels or not all(_in(x, -MAX_SCORE, MAX_SCORE)
                                                                        for x in exp):
            raise _bad(f"self_test.cases[{i}].expected must be {n_labels} numbers within "
                       f"+-{MAX_SCORE:g} (one per label)")
        cases.append(SelfTestCase(input=raw, expected=[float(x) for x in exp]))
    return SelfTest(tolerance=float(tol), cases=cases,
                    latency_budget_ms=None if budget is None else float(budget))


def parse_manifest(doc: Any) -> Manifest:
    """Typed manifest from decoded JSON; ``bad_manifest``/``unsupported_schema`` on any problem."""
    if not isinstance(doc, dict):
        raise _bad("manifest must be a JSON object")
    sv = doc.get("schema_version")
    if not _is_int(sv):
        raise _bad("schema_version must be an integer")
    if sv != SCHEMA_VERSION:
        raise refuse("unsupported_schema", f"schema_version {sv} (this device reads {SCHEMA_VERSION}); "
                                           "update kestrel-edge first")
    missing = _MANIFEST_KEYS - set(doc)
    if missing:
        raise _bad(f"missing field {sorted(missing)[0]!r}")
    unknown = set(doc) - _MANIFEST_KEYS
    if unknown:
        raise _bad(f"unknown field {sorted(unknown)[0]!r}")
    name = doc["model_name"]
    if not valid_model_name(name):
        raise _bad("model_name must be 1-64 characters of A-Z a-z 0-9 . _ -")
    version = doc["version"]
    if not _is_int(version) or not 1 <= version <= MAX_VERSION:
        raise _bad(f"version must be an integer within 1..{MAX_VERSION}")
    created, expires = doc["created"], doc["expires"]
    if not _in(created, 0, MAX_TIME_S) or not _in(expires, 0, MAX_TIME_S):
        raise _bad(f"created and expires must be unix times in seconds within 0..{MAX_TIME_S}")
    if expires <= created:
        raise _bad("expires must be after created")
    files_doc = doc["files"]
    if not isinstance(files_doc, dict) or not files_doc:
        raise _bad("files must be a non-empty object")
    files: Dict[str, FileEntry] = {}
    for fname, ent in files_doc.items():
        if not _full(_NAME_RE, fname) or fname in RESERVED_PAYLOAD:
            raise _bad(f"file name {fname!r} is not allowed")
        if not isinstance(ent, dict) or set(ent) != {"sha256", "length"}:
            raise _bad(f"files[{fname!r}] must be {{sha256, length}}")
        if not _full(_HEX64_RE, ent["sha256"]):
            raise _bad(f"files[{fname!r}].sha256 must be 64 lowercase hex digits")
        if not _is_int(ent["length"]) or not 0 <= ent["length"] <= MAX_FILE_BYTES:
            raise _bad(f"files[{fname!r}].length must be an integer within 0..{MAX_FILE_BYTES}")
        files[fname] = FileEntry(sha256=ent["sha256"], length=ent["length"])
    model_file = doc["model_file"]
    if not isinstance(model_file, str) or model_file not in files:
        raise _bad("model_file must name one of the files")
    if LABELS_FILE not in files:
        raise _bad(f"files must include {LABELS_FILE}")
    if not isinstance(doc["input"], dict):
        raise _bad("input must be an object")
    _check_input_doc(doc["input"])
    try:
        spec = InputSpec.from_dict(doc["input"])
    except (ValueError, TypeError, OverflowError) as exc:
        raise _bad(f"input: {exc}") from None
    if spec.to_dict() != doc["input"]:
        raise _bad("input must list every input spec field with its proper type")
    labels = doc["labels"]
    if (not isinstance(labels, list) or not 0 < len(labels) <= MAX_LABELS
            or not all(isinstance(x, str) and 0 < len(x) <= MAX_LABEL_CHARS for x in labels)
            or len(set(labels)) != len(labels) or any("\n" in x or "\r" in x for x in labels)):
        raise _bad(f"labels must be a non-empty list of at most {MAX_LABELS} distinct one-line strings "
                   f"of 1..{MAX_LABEL_CHARS} characters")
    thr = doc["default_threshold"]
    if not _in(thr, 0, 1):
        raise _bad("default_threshold must be a number within 0..1")
    if not isinstance(doc["metrics"], dict):
        raise _bad("metrics must be an object")
    _check_metrics(doc["metrics"])
    st = _parse_self_test(doc["self_test"], spec, len(labels))
    return Manifest(
        schema_version=sv, model_name=name, version=version, created=float(created), expires=float(expires),
        files=files, input_spec=spec, labels=list(labels), default_threshold=float(thr),
        metrics=dict(doc["metrics"]), self_test=st, model_file=model_file, raw=doc,
    )


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
    caller fsyncs the whole staging directory once (edge.atomic.fsync_tree) before it is used.
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
