"""The signed bundle's manifest: the format's names and bounds, the typed manifest, its JSON rules.

Everything a bundle's manifest.json may say and how it is read: the member and file names
(``manifest.json``, ``manifest.sig``, the payload files, the slot files no bundle may carry), every
``MAX_*`` bound (sizes, and the manifest's numbers, which must fit the wire and float arithmetic),
the refusal vocabulary verification raises (``REASONS``, ``refuse``), the frozen dataclasses
(``Manifest``, ``FileEntry``, ``SelfTest``, ``SelfTestCase``), ``canonical_json`` and the strict JSON
reader, and ``parse_manifest``, which turns decoded JSON into a ``Manifest`` or refuses it
(``bad_manifest``, ``unsupported_schema``). Pure: no IO, no clock. The container is
proto.bundle_container; signing, verification and staging are proto.bundle.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from typing import Any, Dict, List, Optional, Tuple

from proto.errors import BundleError
from proto.inputspec import InputSpec
from proto.modelname import valid_model_name

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIG_NAME = "manifest.sig"
MODEL_FILE = "model.tflite"
LABELS_FILE = "labels.txt"
RESERVED = (MANIFEST_NAME, SIG_NAME)
# Names the updater's slot layout uses next to the payload files (edge.updater.slots): never payload.
SLOT_RECORD_NAME = "slot.json"
SLOT_BUNDLE_NAME = "bundle.kbundle"
RESERVED_PAYLOAD = RESERVED + (SLOT_RECORD_NAME, SLOT_BUNDLE_NAME)

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

# fullmatch with \Z semantics: "$" would also match before a trailing newline ("name\n").
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")


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
