"""The registry over real gRPC: a server on a free loopback port, real signed bundles, real SQLite."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import grpc
import pytest

from hub.registry import Registry, RegistryConfig
from hub.store.open import open_store
from proto import kestrel_pb2, kestrel_pb2_grpc
from proto.errors import HubError
from proto.hubclient import HubClient, HubRefused
from proto.hubcreds import Credentials
from proto.keys import public_key_text
from tests.helpers import hubgrpc
from tests.helpers.bundles import make_bundle, make_keypair
from tests.helpers.wait import wait_for


@pytest.fixture
def keys(tmp_path):
    return make_keypair(tmp_path, "fleet")


@pytest.fixture
def hub(tmp_path, keys):
    data = tmp_path / "hub"
    trust = data / "trust"
    trust.mkdir(parents=True)
    (trust / "fleet.pub").write_text(public_key_text(keys.public))
    store = open_store(data / "hub.db")
    reg = Registry(store, RegistryConfig(chunk_size=4096), data)
    server, port, creds = hubgrpc.serve(reg, None, store)
    client = hubgrpc.client(port, creds)
    yield reg, client, port
    client.close()
    server.stop(None)
    store.close()


@pytest.fixture
def model_path(models_dir) -> Path:
    return models_dir / "brightness_int8.tflite"


def _stored_files(reg: Registry):
    """Push temp files and the store's bundle files (the SQLite store keeps them next to its database)."""
    return sorted(p.name for d in (reg.push_dir, reg.store.blobs.dir) if d.is_dir() for p in d.iterdir())


def test_push_then_fetch_identical_bytes_and_resume(hub, keys, model_path):
    reg, client, _ = hub
    data = make_bundle(model_path, keys, version=3, metrics={"accuracy": 0.93, "f1": 0.9})
    res = client.push(data, chunk_size=1000)
    assert res.model.name == "brightness" and res.model.version == 3
    assert res.bundle_sha256 == hashlib.sha256(data).hexdigest() and res.size == len(data)
    assert res.model.sha256 == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert _stored_files(reg) == [f"{res.bundle_sha256}.kbundle"]

    got = client.fetch("brightness", 3, chunk_size=1024)
    assert got == data

    # Chunks carry offsets, the total and the hash; a resumed fetch returns exactly the rest.
    chunks = list(client.registry.FetchModel(kestrel_pb2.FetchRequest(model_name="brightness", version=3,
                                                                      offset=0, chunk_size=4096), timeout=10,
                                                  metadata=client.metadata))
    assert len(chunks) == -(-len(data) // 4096)
    assert [c.offset for c in chunks] == list(range(0, len(data), 4096))
    assert {c.sha256 for c in chunks} == {res.bundle_sha256} and {c.total_size for c in chunks} == {len(data)}
    cut = len(data) // 3 + 7
    rest = client.fetch("brightness", 3, offset=cut)
    assert data[:cut] + rest == data
    # version 0 = the highest
    assert client.fetch("brightness", 0) == data


def test_list_models_shows_versions_with_metrics(hub, keys, model_path):
    _, client, _ = hub
    client.push(make_bundle(model_path, keys, version=1, metrics={"accuracy": 0.81}))
    client.push(make_bundle(model_path, keys, version=2, metrics={"accuracy": 0.88}))
    client.push(make_bundle(None, keys, version=5, name="other", metrics={"accuracy": 0.5}))
    versions = client.list_models("brightness")
    assert [v.model.version for v in versions] == [2, 1]
    assert [json.loads(v.metrics_json)["accuracy"] for v in versions] == [0.88, 0.81]
    assert all(v.key_id == keys.key_id and v.size > 0 and v.created_ms > 0 for v in versions)
    assert {v.model.name for v in client.list_models()} == {"brightness", "other"}


def test_fetch_unknown_version_is_not_found(hub, keys, model_path):
    _, client, _ = hub
    client.push(make_bundle(model_path, keys, version=1))
    with pytest.raises(HubRefused) as ei:
        client.fetch("brightness", 9)
    assert ei.value.code == "NOT_FOUND" and "version 9" in ei.value.detail
    with pytest.raises(HubRefused) as ei:
        client.fetch("nosuch", 0)
    assert ei.value.code == "NOT_FOUND"


def _flip_model_byte(data: bytes, model: bytes) -> bytes:
    at = data.find(model[200:264]) + 10
    assert at > 10
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)


def test_tampered_untrusted_and_old_bundles_are_refused_and_nothing_stored(hub, keys, model_path, tmp_path):
    reg, client, _ = hub
    good = make_bundle(model_path, keys, version=4)
    tampered = _flip_model_byte(good, model_path.read_bytes())
    with pytest.raises(HubRefused) as ei:
        client.push(tampered)
    assert ei.value.code == "INVALID_ARGUMENT" and "hash_mismatch" in ei.value.detail

    stranger = make_keypair(tmp_path, "stranger")
    with pytest.raises(HubRefused) as ei:
        client.push(make_bundle(model_path, stranger, version=4))
    assert ei.value.code == "FAILED_PRECONDITION" and "untrusted_key" in ei.value.detail
    assert client.list_models() == [] and _stored_files(reg) == []

    client.push(good)
    with pytest.raises(HubRefused) as ei:
        client.push(make_bundle(model_path, keys, version=3))
    assert ei.value.code == "FAILED_PRECONDITION" and "not_newer" in ei.value.detail
    with pytest.raises(HubRefused) as ei:  # same version, different content
        client.push(make_bundle(model_path, keys, version=4, metrics={"accuracy": 0.1}))
    assert ei.value.code == "ALREADY_EXISTS"
    # An identical retry is idempotent.
    assert client.push(good).bundle_sha256 == hashlib.sha256(good).hexdigest()
    assert [v.model.version for v in client.list_models()] == [4]
    assert _stored_files(reg) == [f"{hashlib.sha256(good).hexdigest()}.kbundle"]


def _raw_push(client: HubClient, chunks):
    return client.registry.PushModel(iter(chunks), timeout=10, metadata=client.metadata)


def test_cut_off_push_leaves_no_partial_version(hub, keys, model_path):
    reg, client, _ = hub
    data = make_bundle(model_path, keys, version=1)
    sha = hashlib.sha256(data).hexdigest()
    half = len(data) // 2
    # The client's stream ends after half the announced bytes.
    with pytest.raises(grpc.RpcError) as ei:
        _raw_push(client, [kestrel_pb2.PushChunk(data=data[:half], total_size=len(data), sha256=sha)])
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "incomplete" in ei.value.details()
    # More bytes than announced.
    with pytest.raises(grpc.RpcError) as ei:
        _raw_push(client, [kestrel_pb2.PushChunk(data=data[:half], total_size=half, sha256=sha),
                         kestrel_pb2.PushChunk(data=data[half:])])
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "size_mismatch" in ei.value.details()
    # Whole bytes but the wrong announced hash.
    with pytest.raises(grpc.RpcError) as ei:
        _raw_push(client, [kestrel_pb2.PushChunk(data=data, total_size=len(data), sha256="0" * 64)])
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hash_mismatch" in ei.value.details()
    assert client.list_models() == [] and _stored_files(reg) == []


def test_cancelled_push_leaves_no_partial_version(hub, keys, model_path):
    reg, client, _ = hub
    data = make_bundle(model_path, keys, version=1)
    sha = hashlib.sha256(data).hexdigest()
    sent_first = threading.Event()
    release = threading.Event()

    def chunks():
        yield kestrel_pb2.PushChunk(data=data[:4096], total_size=len(data), sha256=sha)
        sent_first.set()
        release.wait(10)

    fut = client.registry.PushModel.future(chunks(), timeout=20, metadata=client.metadata)
    assert sent_first.wait(10)
    wait_for(lambda: any(p.name.startswith(".push-") for p in reg.push_dir.iterdir()), 10,
             what="the server to start receiving")
    fut.cancel()
    release.set()
    assert fut.cancelled()
    wait_for(lambda: _stored_files(reg) == [], 10, what="the temp file of the cancelled push to go")
    assert client.list_models() == []
    # The registry still accepts the full push afterwards.
    assert client.push(data).model.version == 1


def test_unreachable_hub_is_a_transport_error():
    from tests.helpers.broker import free_port

    with HubClient(f"127.0.0.1:{free_port()}", timeout_s=2, creds=Credentials(plaintext=True)) as c, \
            pytest.raises(HubError) as ei:
        c.list_models()
    assert "unreachable" in str(ei.value) or "did not answer" in str(ei.value)


def test_stalled_push_is_cut_off_by_push_timeout(tmp_path, keys, model_path):
    data_dir = tmp_path / "hub2"
    (data_dir / "trust").mkdir(parents=True)
    (data_dir / "trust" / "fleet.pub").write_text(public_key_text(keys.public))
    store = open_store(data_dir / "hub.db")
    reg = Registry(store, RegistryConfig(push_timeout_s=0.5), data_dir)
    server, port, creds = hubgrpc.serve(reg, None, store, max_workers=2)
    data = make_bundle(model_path, keys, version=1)
    release = threading.Event()

    def stalled():
        sha = hashlib.sha256(data).hexdigest()
        yield kestrel_pb2.PushChunk(data=data[:4096], total_size=len(data), sha256=sha)
        release.wait(30)  # the client never sends the rest

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            fut = kestrel_pb2_grpc.ModelRegistryStub(ch).PushModel.future(stalled(), timeout=30,
                                                                          metadata=hubgrpc.metadata(creds))
            exc = fut.exception(timeout=20)
            release.set()
        assert exc is not None and exc.code() == grpc.StatusCode.CANCELLED
        wait_for(lambda: _stored_files(reg) == [], 10, what="the stalled push's temp file to go")
        assert store.list_models() == []
    finally:
        release.set()
        server.stop(None)
        store.close()


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and data.count(old) == 1, old
    return data.replace(old, new)


def test_manifest_or_signature_byte_changed_under_a_trusted_key_is_refused(hub, keys, model_path):
    """The signer is trusted, the container is well formed, the file hashes match: only the signed
    manifest (one digit) or the signature (one base64 character) differs. Refused, nothing stored."""
    reg, client, _ = hub
    good = make_bundle(model_path, keys, version=5)
    manifest_changed = _replace_once(good, b'"version":5', b'"version":6')
    sig_at = good.index(b'"sig":"') + len(b'"sig":"') + 10
    sig_changed = bytearray(good)
    sig_changed[sig_at] = ord("A") if good[sig_at] != ord("A") else ord("B")
    for bad in (manifest_changed, bytes(sig_changed)):
        with pytest.raises(HubRefused) as ei:
            client.push(bad)
        assert ei.value.code == "INVALID_ARGUMENT" and "bad_signature" in ei.value.detail, ei.value.detail
    assert client.list_models() == [] and _stored_files(reg) == []
    assert client.push(good).model.version == 5  # the untouched bundle still goes in


def test_fetch_when_the_bundle_file_is_missing_is_unavailable_with_the_reason(hub, keys, model_path):
    """A record without its bytes (removed from the store): UNAVAILABLE, not INTERNAL, saying what to do."""
    reg, client, _ = hub
    data = make_bundle(model_path, keys, version=2)
    res = client.push(data)
    assert reg.store.delete_blob(res.bundle_sha256)
    with pytest.raises(HubError) as ei:
        client.fetch("brightness", 2)
    assert "blob_dir" in str(ei.value) and "unreachable" in str(ei.value)
