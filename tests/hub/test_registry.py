"""Registry semantics without gRPC: config, atomic acceptance, refusals, fetch edge cases."""

from __future__ import annotations

import hashlib

import pytest

from hub import config as hubconfig
from hub.errors import NotFound, RegistryError
from hub.registry import EXISTS, INVALID, PRECONDITION, BundleBytesMissing, PushRefused, Registry, RegistryConfig
from hub.store.open import open_store
from proto import kestrel_pb2
from proto.errors import ConfigError
from proto.keys import public_key_text
from tests.helpers.bundles import make_bundle, make_keypair


def chunks_of(data: bytes, size: int = 4096, total: int = -1, sha: str = ""):
    for i in range(0, len(data), size):
        if i == 0:
            yield kestrel_pb2.PushChunk(data=data[:size], total_size=len(data) if total < 0 else total,
                                        sha256=sha or hashlib.sha256(data).hexdigest())
        else:
            yield kestrel_pb2.PushChunk(data=data[i:i + size])


@pytest.fixture
def env(tmp_path):
    keys = make_keypair(tmp_path, "fleet")
    data = tmp_path / "hub"
    (data / "trust").mkdir(parents=True)
    (data / "trust" / "fleet.pub").write_text(public_key_text(keys.public))
    store = open_store(data / "hub.db")
    yield store, data, keys
    store.close()


def test_config_section_in_hub_toml(tmp_path):
    cfg_file = tmp_path / "hub.toml"
    cfg_file.write_text('[registry]\nblob_dir = "/srv/models"\nchunk_size = 65536\n')
    cfg = hubconfig.load(cfg_file)
    assert isinstance(cfg.registry, RegistryConfig)
    assert cfg.registry.blob_dir == "/srv/models" and cfg.registry.chunk_size == 65536
    cfg_file.write_text("[registry]\nchunk = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'registry.chunk'"):
        hubconfig.load(cfg_file)
    cfg_file.write_text("[registry]\nchunk_size = 10\n")
    with pytest.raises(ConfigError, match="chunk_size"):
        hubconfig.load(cfg_file)


def test_default_dirs_and_stale_temp_files_removed(env):
    store, data, _ = env
    (data / "pushes").mkdir()
    stale = data / "pushes" / ".push-abc.tmp"
    stale.write_bytes(b"half a bundle")
    reg = Registry(store, RegistryConfig(), data)
    assert reg.legacy_dir == data / "models" and reg.trust_dir == data / "trust" and reg.push_dir == data / "pushes"
    assert not stale.exists()


def test_bundles_live_in_the_store_and_a_second_hub_on_it_serves_them(env, tmp_path):
    """No shared folder: a hub with another data folder on the same store fetches what the first one took."""
    store, data, keys = env
    bundle = make_bundle(None, keys, version=1)
    rec = Registry(store, RegistryConfig(), data).push(chunks_of(bundle))
    assert store.has_blob(rec.bundle_sha256) and not (data / "models").exists()
    other = Registry(store, RegistryConfig(trust_dir=str(data / "trust")), tmp_path / "worker-2")
    assert b"".join(c.data for c in other.fetch("brightness", 1)) == bundle


def test_bundles_of_an_older_hub_are_copied_into_the_store_at_start(env):
    store, data, keys = env
    bundle = make_bundle(None, keys, version=1)
    sha = hashlib.sha256(bundle).hexdigest()
    legacy = data / "models"
    legacy.mkdir()
    (legacy / f"{sha}.kbundle").write_bytes(bundle)
    damaged = hashlib.sha256(b"other").hexdigest()
    (legacy / f"{damaged}.kbundle").write_bytes(b"not the bytes its name says")
    from hub.store.base import ModelRecord
    store.add_model(ModelRecord("brightness", 1, sha, len(bundle), 1))  # the older hub's record
    reg = Registry(store, RegistryConfig(), data)
    assert reg.imported == 1 and store.has_blob(sha) and not store.has_blob(damaged)
    assert b"".join(c.data for c in reg.fetch("brightness", 1)) == bundle
    assert Registry(store, RegistryConfig(), data).imported == 0  # once


def test_pushing_again_brings_back_bytes_the_store_lost(env):
    store, data, keys = env
    reg = Registry(store, RegistryConfig(), data)
    bundle = make_bundle(None, keys, version=1)
    rec = reg.push(chunks_of(bundle))
    assert store.delete_blob(rec.bundle_sha256)
    with pytest.raises(BundleBytesMissing, match="push it again"):
        reg.fetch("brightness", 1)
    assert reg.push(chunks_of(bundle)) == rec
    assert b"".join(c.data for c in reg.fetch("brightness", 1)) == bundle


def test_stream_failing_midway_leaves_nothing(env, models_dir):
    store, data, keys = env
    reg = Registry(store, RegistryConfig(), data)
    bundle = make_bundle(models_dir / "brightness_int8.tflite", keys, version=1)

    class Cancelled(Exception):
        pass

    def broken():
        it = chunks_of(bundle)
        yield next(it)
        yield next(it)
        raise Cancelled()

    with pytest.raises(Cancelled):
        reg.push(broken())
    assert list(reg.push_dir.iterdir()) == [] and store.list_models() == [] and not store.blobs.dir.exists()
    rec = reg.push(chunks_of(bundle))
    assert rec.version == 1 and store.open_blob(rec.bundle_sha256).read() == bundle


def test_refusal_kinds(env, models_dir, tmp_path):
    store, data, keys = env
    reg = Registry(store, RegistryConfig(max_bundle_bytes=1000), data)
    bundle = make_bundle(models_dir / "brightness_int8.tflite", keys, version=1)
    with pytest.raises(PushRefused) as ei:
        reg.push(chunks_of(bundle))
    assert ei.value.reason == "too_large" and ei.value.kind == INVALID
    with pytest.raises(PushRefused) as ei:
        reg.push(iter([]))
    assert ei.value.reason == "empty"
    with pytest.raises(PushRefused) as ei:
        reg.push(iter([kestrel_pb2.PushChunk(data=b"x", total_size=1)]))
    assert ei.value.reason == "no_hash"

    reg = Registry(store, RegistryConfig(), data)
    reg.push(chunks_of(make_bundle(None, keys, version=2)))
    with pytest.raises(PushRefused) as ei:
        reg.push(chunks_of(make_bundle(None, keys, version=1)))
    assert (ei.value.reason, ei.value.kind) == ("not_newer", PRECONDITION)
    with pytest.raises(PushRefused) as ei:
        reg.push(chunks_of(make_bundle(None, keys, version=2, metrics={"x": 1})))
    assert ei.value.kind == EXISTS
    expired = make_bundle(None, keys, version=3, created=1_000_000, expires_in_s=10)
    with pytest.raises(PushRefused) as ei:
        reg.push(chunks_of(expired))
    assert (ei.value.reason, ei.value.kind) == ("expired", PRECONDITION)

    no_trust = Registry(store, RegistryConfig(trust_dir=str(tmp_path / "empty")), data)
    with pytest.raises(PushRefused) as ei:
        no_trust.push(chunks_of(make_bundle(None, keys, version=9)))
    assert ei.value.reason == "no_trusted_keys" and "does not exist" in str(ei.value)
    assert [m.version for m in store.list_models()] == [2]
    assert len(list(store.blobs.dir.iterdir())) == 1 and list(reg.push_dir.iterdir()) == []


def test_fetch_edges(env):
    store, data, keys = env
    reg = Registry(store, RegistryConfig(chunk_size=4096), data)
    bundle = make_bundle(None, keys, version=1)
    reg.push(chunks_of(bundle))
    (end,) = list(reg.fetch("brightness", 1, offset=len(bundle)))
    assert end.data == b"" and end.offset == len(bundle) == end.total_size
    with pytest.raises(RegistryError, match="beyond the end"):
        reg.fetch("brightness", 1, offset=len(bundle) + 1)
    with pytest.raises(NotFound):
        reg.fetch("brightness", 2)
    assert b"".join(c.data for c in reg.fetch("brightness", 1, chunk_size=100)) == bundle
