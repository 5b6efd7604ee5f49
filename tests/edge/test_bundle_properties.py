"""Property-based: no mutation of a valid bundle is accepted, and verification raises nothing but
BundleError, whatever the bytes. Python 3.8 compatible; a few hundred examples each (seconds)."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proto import bundle as B
from proto import keys as K
from proto import manifest as M
from proto.errors import BundleError
from proto.inputspec import InputSpec
from tests.helpers.bundles import make_bundle, members_of, raw_container, rebuild, tar_header

NOW = 1_800_000_000.0
KEY = Ed25519PrivateKey.generate()
TRUSTED: Dict[str, K.PublicKey] = {K.key_id(KEY): KEY.public_key()}
STEST = {"tolerance": 0.05, "latency_budget_ms": 50.0,
         "cases": [{"input": bytes(range(12)), "expected": [0.5, 0.25, 0.25]}]}
SPEC = InputSpec(shape=[1, 2, 2, 3], dtype="uint8", scale=1 / 255.0)
GOOD = make_bundle(b"model-bytes " * 40, KEY, version=5, created=NOW, spec=SPEC, self_test=STEST,
                   extra_files={"README": b"hi"})
OTHER = make_bundle(b"other-model " * 40, KEY, version=6, created=NOW, spec=SPEC, self_test=STEST,
                    extra_files={"README": b"hi"})
VALID = {GOOD, OTHER}
PROFILE = settings(max_examples=int(__import__("os").environ.get("KESTREL_HYPOTHESIS_EXAMPLES", "200")), deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])


def outcome(data: bytes) -> str:
    """'ok' or the refusal reason; any other exception fails the test."""
    try:
        B.verify_bundle(data, TRUSTED, now=NOW)
    except BundleError as exc:
        assert exc.reason in M.REASONS
        return exc.reason
    return "ok"


def test_the_unmutated_bundles_verify() -> None:
    assert outcome(GOOD) == "ok" and outcome(OTHER) == "ok"


def _flip(data: bytes, pos: int, mask: int) -> bytes:
    b = bytearray(data)
    b[pos % len(b)] ^= mask
    return bytes(b)


Mutation = Tuple[str, int, int, bytes]


def apply(d: bytes, mut: Mutation) -> bytes:
    """Apply one described mutation (readable in hypothesis failure reports)."""
    kind, a, b, blob = mut
    n = max(len(d), 1)
    i = a % n
    if kind == "flip":
        return _flip(d, i, b % 255 + 1) if d else d
    if kind == "truncate":
        return d[:i]
    if kind == "insert":
        return d[:i] + blob + d[i:]
    if kind == "delete":
        return d[:i] + d[i + 1 + b % 1200:]
    if kind == "splice":  # overwrite a range with bytes of the other valid bundle or of itself
        src = OTHER if b % 2 else d
        j = (b // 2) % max(len(src), 1)
        piece = src[j:j + 1 + a % 2048]
        return d[:i] + piece + d[i + len(piece):]
    if kind == "block":  # insert a whole 512-byte block at a block boundary
        k = (a % max(len(d) // 512, 1)) * 512
        return d[:k] + (blob * 512)[:512] + d[k:]
    raise AssertionError(kind)


mutations: st.SearchStrategy[Mutation] = st.tuples(
    st.sampled_from(["flip", "truncate", "insert", "delete", "splice", "block"]),
    st.integers(0, 10 ** 6), st.integers(0, 10 ** 6), st.binary(min_size=1, max_size=600),
)


@PROFILE
@given(st.lists(mutations, min_size=1, max_size=3))
def test_raw_mutations_are_never_accepted(muts: List[Mutation]) -> None:
    data = GOOD
    for m in muts:
        data = apply(data, m)
    result = outcome(data)
    event(result)
    if data in VALID:
        assert result == "ok"
    else:
        assert result != "ok", "a mutated bundle was accepted"


@PROFILE
@given(st.integers(0, 10 ** 6), st.sampled_from([0, 1, 2, 3, 4]), st.integers(1, 255), st.booleans())
def test_member_content_mutations_reach_the_deep_checks(pos: int, which: int, mask: int, grow: bool) -> None:
    # Rebuilding a canonical container gets past the container checks: signature/hash must catch it.
    members = members_of(GOOD)
    name, content = members[which]
    content = content + bytes([mask]) if grow else _flip(content, pos, mask)
    members[which] = (name, content)
    result = outcome(rebuild(members))
    assert result != "ok"
    if name == "manifest.json":
        assert result == "bad_signature"
    elif name == "manifest.sig":  # a flipped key_id digit names a key nobody trusts
        assert result in ("bad_signature", "untrusted_key")
    else:
        assert result in ("hash_mismatch", "length_mismatch")


names = st.one_of(
    st.sampled_from(["manifest.json", "manifest.sig", "model.tflite", "labels.txt", "../x", "/abs", "a/b",
                     ""]),
    st.binary(min_size=0, max_size=110),
)
entries: st.SearchStrategy[List[Tuple[bytes, bytes]]] = st.lists(
    st.tuples(names, st.sampled_from([b"0", b"\0", b"1", b"2", b"3", b"5", b"x", b"7"]),
              st.binary(max_size=700), st.integers(-3, 3), st.binary(max_size=8)).map(
        lambda t: (tar_header(t[0], max(0, len(t[2]) + t[3]), typeflag=t[1], prefix=t[4]), t[2])),
    max_size=5,
)


@PROFILE
@given(entries)
def test_hostile_containers_raise_only_bundle_error(ents: Any) -> None:
    assert outcome(raw_container(ents)) != "ok"


@PROFILE
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_raise_only_bundle_error(data: bytes) -> None:
    assert outcome(data) != "ok"
    try:
        B.read_manifest_unverified(data)
    except BundleError:
        pass


# ---- re-signed random manifests: the signature passes, so the schema bounds must hold ------------

EDGE_NUMBERS = [10 ** 400, -(10 ** 400), 2 ** 63, 2 ** 64, 2 ** 63 - 1, -1, 0, 2 ** 53 + 1, True, False, 1e308,
                -1e308, 5e-324, 253402300800, 0.5]
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(EDGE_NUMBERS),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                          max_leaves=10)
GOOD_DOC = __import__("json").loads(members_of(GOOD)[0][1])
GOOD_PAYLOAD = members_of(GOOD)[2:]


def _paths(obj: Any, prefix: Tuple[Any, ...] = ()) -> List[Tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


PATHS = _paths(GOOD_DOC)


def _resigned(doc: Any) -> bytes:
    import base64

    mb = M.canonical_json(doc)
    kid, sig = K.sign(KEY, B.DOMAIN + mb)
    sb = M.canonical_json({"alg": "ed25519", "key_id": kid, "sig": base64.b64encode(sig).decode()})
    return rebuild([("manifest.json", mb), ("manifest.sig", sb)] + GOOD_PAYLOAD)


@PROFILE
@given(st.lists(st.tuples(st.sampled_from(PATHS), st.sampled_from(["set", "delete", "add"]), json_value,
                          st.text(max_size=8)), min_size=1, max_size=3))
def test_resigned_random_manifests_raise_only_bundle_error_and_respect_bounds(edits: Any) -> None:
    import copy

    from proto import kestrel_pb2

    doc = copy.deepcopy(GOOD_DOC)
    for path, op, value, key in edits:
        parent: Any = doc
        try:
            for p in path[:-1]:
                parent = parent[p]
            last = path[-1]
            if isinstance(parent, dict) and not isinstance(last, str):
                continue  # an earlier edit put a dict where a list was: JSON objects have string keys only
            if op == "set":
                parent[last] = value
            elif op == "delete":
                del parent[last]
            elif isinstance(parent, dict):
                parent[key] = value
            else:
                parent.append(value)
        except (KeyError, IndexError, TypeError, AttributeError):
            continue  # an earlier edit removed or retyped this spot (e.g. a list became a string: no append)
    data = _resigned(doc)
    result = outcome(data)
    event(result)
    try:
        B.read_manifest_unverified(data)
    except BundleError:
        pass
    if result == "ok":  # whatever a signer put there, an accepted manifest fits every consumer
        m = B.verify_bundle(data, TRUSTED, now=NOW).manifest
        kestrel_pb2.ModelRef(name=m.model_name, version=m.version)  # proto uint64
        assert 1 <= m.version < 2 ** 63 and 0 <= m.created < m.expires <= M.MAX_TIME_S
        assert all(isinstance(d, int) and not isinstance(d, bool) for d in m.input_spec.shape)
        assert 0 <= m.self_test.tolerance <= 1 and 0 <= m.default_threshold <= 1
        assert all(abs(x) <= M.MAX_SCORE for c in m.self_test.cases for x in c.expected)
        B._iso(m.expires)
