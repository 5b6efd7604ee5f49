"""The model registry: signed bundles pushed in chunks, verified, kept by content hash.

A push is accepted only when the whole bundle arrived (size and sha256 as announced in the first
chunk), its signature verifies against the fleet's trusted keys (proto.bundle.verify_bundle, the
same check the devices run) and its version is newer than every stored version of that model name.
Pushing the identical bundle again is an idempotent retry and returns the stored record.

Nothing partial is ever visible: the bytes go to a temp file of this hub (``<data_dir>/pushes/``), are
fsynced and verified, then kept by the store as the blob named by their sha256 (``Store.put_blob``: files
next to the SQLite database, GridFS on MongoDB; hub/store/blobs.py); only then is the record added to the
store. Hub workers sharing a store share the bundles with it: no shared folder. A cut-off push removes
its temp file. Bundles an older hub kept in ``[registry] blob_dir`` (``<data_dir>/models``) are imported
into the store at start. See docs/hub-registry.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

# PushRefused, BundleBytesMissing and the refusal kinds are defined in hub.errors, importable from here too
from hub.errors import EXISTS as EXISTS
from hub.errors import INVALID as INVALID
from hub.errors import PRECONDITION as PRECONDITION
from hub.errors import BundleBytesMissing as BundleBytesMissing
from hub.errors import NotFound, RegistryError, StoreError, StoreUnavailable
from hub.errors import PushRefused as PushRefused
from hub.store.base import ModelRecord, Store
from proto import kestrel_pb2
from proto.clock import now_ms
from proto.errors import ArtifactError, BundleError
from proto.keys import PublicKey, load_public_keys
from proto.tomlconf import field

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
BLOB_SUFFIX = ".kbundle"  # the legacy blob_dir's files: <bundle sha256>.kbundle
TEMP_PREFIX = ".push-"
PUSH_DIR = "pushes"  # in data_dir: pushes being received
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

# BundleError reasons (proto.bundle) that mean "not acceptable here" rather than "corrupt".
_PRECONDITION_REASONS = {"untrusted_key", "no_trusted_keys", "expired", "not_yet_valid", "same_version",
                         "downgrade", "not_newer"}


@dataclasses.dataclass
class RegistryConfig:
    blob_dir: str = field("", doc="Where a hub before issue 14 kept pushed bundles (one <sha256>.kbundle file "
                                  "each); empty = <data_dir>/models. Bundles now live in the store (next to "
                                  "the SQLite file, GridFS on MongoDB); those found here that the store lacks "
                                  "are copied into it at start.")
    trust_dir: str = field("", doc="Trusted public keys of the fleet (a key file or a directory of them, "
                                   "as proto.keys.load_public_keys reads); a push is verified against them. "
                                   "Empty = <data_dir>/trust.")
    max_bundle_bytes: int = field(200 * MiB, doc="Pushes announcing a larger bundle are refused (devices "
                                                 "refuse bundles over 200 MiB too).")
    chunk_size: int = field(256 * KiB, doc="Chunk size of FetchModel streams (a request may ask for less); "
                                           "gRPC message limits are set from it.")
    push_timeout_s: float = field(600.0, doc="A push that takes longer than this is refused (nothing kept).")
    clock_slack_s: float = field(300.0, doc="Tolerance for the bundle's creation/expiry times against the "
                                            "hub's clock.")

    def validate(self) -> None:
        if self.max_bundle_bytes <= 0:
            raise ValueError("max_bundle_bytes must be > 0")
        if not 4 * KiB <= self.chunk_size <= 4 * MiB:
            raise ValueError("chunk_size must be between 4096 and 4194304 bytes")
        if self.push_timeout_s <= 0 or self.clock_slack_s < 0:
            raise ValueError("push_timeout_s must be > 0 and clock_slack_s >= 0")


class Registry:
    """Push, list and fetch signed bundles. Thread-safe; state lives in the store and the blob dir."""

    def __init__(self, store: Store, cfg: RegistryConfig, data_dir: str | os.PathLike[str],
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.cfg = cfg
        data = Path(data_dir)
        self.legacy_dir = Path(cfg.blob_dir).expanduser() if cfg.blob_dir else data / "models"
        self.trust_dir = Path(cfg.trust_dir).expanduser() if cfg.trust_dir else data / "trust"
        self.push_dir = data / PUSH_DIR  # this hub's own (one hub per data folder): temp files of pushes
        self.push_dir.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._commit_lock = threading.Lock()
        self._remove_stale_temps()
        self.imported = self._import_legacy()

    # ---- blobs ----
    @staticmethod
    def check_sha(bundle_sha256: str) -> str:
        if not _SHA_RE.match(bundle_sha256):
            raise StoreError(f"corrupt model record: bundle_sha256 {bundle_sha256!r} is not a sha256")
        return bundle_sha256

    def _remove_stale_temps(self) -> None:
        """Temp files of pushes cut off by a crash: never visible, removed at start."""
        for p in self.push_dir.glob(f"{TEMP_PREFIX}*"):
            try:
                p.unlink()
                log.info("removed the leftover of an interrupted push: %s", p.name)
            except OSError:  # pragma: no cover
                pass

    def _import_legacy(self) -> int:
        """Bundles an older hub kept as files in blob_dir go into the store (once: those it has are skipped;
        a file whose bytes do not match its name is left out with a WARNING). How many were copied."""
        if not self.legacy_dir.is_dir():
            return 0
        n = 0
        for p in sorted(self.legacy_dir.glob(f"*{BLOB_SUFFIX}")):
            sha = p.name[:-len(BLOB_SUFFIX)]
            if not _SHA_RE.match(sha) or self.store.has_blob(sha):
                continue
            try:
                with p.open("rb") as f:
                    self.store.put_blob(sha, f, p.stat().st_size)
            except OSError as exc:
                log.warning("cannot read the bundle file %s to move it into the store: %s", p, exc.strerror)
                continue
            except StoreError as exc:
                if isinstance(exc, StoreUnavailable):
                    raise
                log.warning("the bundle file %s was not moved into the store: %s", p, exc)
                continue
            n += 1
        if n:
            log.info("copied %d bundle file(s) of %s into the store (%s); the folder is not read any more "
                     "once every hub of this store runs this version", n, self.legacy_dir, self.store)
        return n

    def trusted_keys(self) -> Dict[str, PublicKey]:
        """The fleet's trusted public keys, read fresh on every push (keys can be added without a restart)."""
        try:
            keys = load_public_keys(self.trust_dir)
        except ArtifactError as exc:
            raise PushRefused("no_trusted_keys", f"cannot load trusted keys from {self.trust_dir}: {exc}",
                              PRECONDITION) from exc
        return dict(keys)

    # ---- push ----
    def push(self, chunks: Iterable[kestrel_pb2.PushChunk],
             deadline: Optional[float] = None) -> ModelRecord:
        """Receive a bundle; returns its record (new, or the existing one for an identical retry).

        Raises PushRefused (nothing stored) for anything wrong; exceptions raised by ``chunks`` itself
        (a cancelled stream) propagate after the temp file is removed.
        """
        if deadline is None:
            deadline = time.monotonic() + self.cfg.push_timeout_s
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=str(self.push_dir))
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                total, announced_sha, digest, received = self._receive(chunks, out, deadline)
                out.flush()
                os.fsync(out.fileno())
            if received != total:
                raise PushRefused("incomplete", f"the stream ended after {received} of {total} bytes; "
                                                "nothing was stored, push again")
            actual = digest.hexdigest()
            if actual != announced_sha:
                raise PushRefused("hash_mismatch", f"received bytes hash to {actual[:16]}..., the "
                                                   f"first chunk announced {announced_sha[:16]}...; "
                                                   "nothing was stored")
            return self._accept(tmp, actual, total)
        finally:
            if tmp.exists():
                try:
                    tmp.unlink()
                except OSError:  # pragma: no cover
                    log.warning("could not remove push temp file %s", tmp)

    def _receive(self, chunks: Iterable[kestrel_pb2.PushChunk], out: BinaryIO,
                 deadline: float) -> Tuple[int, str, hashlib._Hash, int]:
        total = -1
        announced = ""
        digest = hashlib.sha256()
        received = 0
        for chunk in chunks:
            if time.monotonic() > deadline:
                raise PushRefused("timeout", f"the push took longer than push_timeout_s="
                                             f"{self.cfg.push_timeout_s:g}s; nothing was stored")
            if total < 0:
                total = int(chunk.total_size)
                announced = chunk.sha256.lower()
                if total <= 0:
                    raise PushRefused("no_size", "the first chunk must carry total_size > 0")
                if not _SHA_RE.match(announced):
                    raise PushRefused("no_hash", "the first chunk must carry the bundle's sha256 "
                                                 "(64 hex digits)")
                if total > self.cfg.max_bundle_bytes:
                    raise PushRefused("too_large", f"bundle of {total} bytes is over max_bundle_bytes="
                                                   f"{self.cfg.max_bundle_bytes}")
            data = bytes(chunk.data)
            received += len(data)
            if received > total:
                raise PushRefused("size_mismatch", f"received more than the announced total_size={total} "
                                                   "bytes; nothing was stored")
            digest.update(data)
            out.write(data)
        if total < 0:
            raise PushRefused("empty", "the push stream carried no chunk")
        return total, announced, digest, received

    def _accept(self, tmp: Path, bundle_sha: str, size: int) -> ModelRecord:
        from proto.bundle import verify_bundle

        data = tmp.read_bytes()
        keys = self.trusted_keys()
        try:
            vb = verify_bundle(data, keys, installed_version=0, now=self._clock(),
                               clock_slack_s=self.cfg.clock_slack_s,
                               max_bundle_bytes=self.cfg.max_bundle_bytes)
        except BundleError as exc:
            kind = PRECONDITION if exc.reason in _PRECONDITION_REASONS else INVALID
            raise PushRefused(exc.reason, str(exc), kind) from exc
        man = vb.manifest
        name, version = str(man.model_name), int(man.version)
        record = ModelRecord(model_name=name, version=version, bundle_sha256=bundle_sha, size=size,
                             created_ms=now_ms(), model_sha256=hashlib.sha256(vb.model_bytes).hexdigest(),
                             key_id=str(vb.key_id), metrics=dict(getattr(man, "metrics", None) or {}),
                             labels=[str(x) for x in (getattr(man, "labels", None) or [])])
        with self._commit_lock:
            existing = self.store.get_model(name, version)
            if existing is not None:
                if existing.bundle_sha256 == bundle_sha:
                    if not self.store.has_blob(bundle_sha):  # the bytes went missing: the push brings them back
                        self._keep(tmp, bundle_sha, size)
                    log.info("push of %s v%d repeated with identical bytes: kept the stored one",
                             name, version)
                    return existing
                raise PushRefused("exists", f"{name} version {version} exists already with different "
                                            "content; bump the version", EXISTS)
            highest = self.highest_version(name)
            if version <= highest:
                raise PushRefused("not_newer", f"{name} version {version} is not newer than the highest "
                                               f"stored version {highest}; versions only go up", PRECONDITION)
            self._keep(tmp, bundle_sha, size)  # the bytes first: a record never names a blob that is not there
            if not self.store.add_model(record):  # another hub process won the race
                other = self.store.get_model(name, version)
                if other is not None and other.bundle_sha256 == bundle_sha:
                    return other
                self.store.delete_blob(bundle_sha)
                raise PushRefused("exists", f"{name} version {version} was pushed concurrently with "
                                            "different content", EXISTS)
        log.info("accepted %s v%d (%d bytes, sha256 %s, key %s)", name, version, size, bundle_sha[:12],
                 record.key_id)
        return record

    def _keep(self, tmp: Path, bundle_sha: str, size: int) -> None:
        with tmp.open("rb") as f:
            self.store.put_blob(bundle_sha, f, size)

    # ---- queries ----
    def highest_version(self, model_name: str) -> int:
        versions = self.store.list_models(model_name)
        return max((m.version for m in versions), default=0)

    def list_models(self, model_name: Optional[str] = None) -> List[ModelRecord]:
        return self.store.list_models(model_name or None)

    def get(self, model_name: str, version: int = 0) -> ModelRecord:
        """One version (0 = the highest); NotFound when there is none."""
        if not model_name:
            raise NotFound("model_name is required")
        if version == 0:
            models = self.store.list_models(model_name)
            if not models:
                raise NotFound(f"no versions of model {model_name!r} in the registry")
            return max(models, key=lambda m: m.version)
        rec = self.store.get_model(model_name, version)
        if rec is None:
            raise NotFound(f"model {model_name!r} version {version} is not in the registry")
        return rec

    def fetch(self, model_name: str, version: int = 0, offset: int = 0,
              chunk_size: int = 0) -> Iterator[kestrel_pb2.FetchChunk]:
        """Chunks of the stored bundle from ``offset``; every chunk carries total size and sha256."""
        rec = self.get(model_name, version)
        size = chunk_size if 0 < chunk_size <= self.cfg.chunk_size else self.cfg.chunk_size
        if offset > rec.size:
            raise RegistryError(f"offset {offset} is beyond the end of the bundle ({rec.size} bytes)")
        try:
            f = self.store.open_blob(self.check_sha(rec.bundle_sha256))
        except BundleBytesMissing as exc:
            # the record is in the store but its bytes are not: removed, or pushed through a hub of an older
            # version whose blob_dir this hub does not read
            raise BundleBytesMissing(
                f"{model_name} v{rec.version} is in the registry but the store has no bundle "
                f"{rec.bundle_sha256[:16]}... ({exc}); push it again, or start a hub that has it in its "
                "[registry] blob_dir once (it copies it into the store; docs/hub-registry.md)") from exc
        return self._read(f, rec, offset, size)

    @staticmethod
    def _read(f: BinaryIO, rec: ModelRecord, offset: int, size: int) -> Iterator[kestrel_pb2.FetchChunk]:
        with f:
            f.seek(offset)
            pos = offset
            if pos == rec.size:
                yield kestrel_pb2.FetchChunk(data=b"", offset=pos, total_size=rec.size,
                                             sha256=rec.bundle_sha256)
                return
            while pos < rec.size:
                data = f.read(size)
                if not data:
                    raise StoreError(f"the stored bundle of {rec.model_name} v{rec.version} is shorter than "
                                     "recorded")
                yield kestrel_pb2.FetchChunk(data=data, offset=pos, total_size=rec.size,
                                             sha256=rec.bundle_sha256)
                pos += len(data)


def model_version_message(rec: ModelRecord) -> kestrel_pb2.ModelVersion:
    import json

    return kestrel_pb2.ModelVersion(
        model=kestrel_pb2.ModelRef(name=rec.model_name, version=rec.version, sha256=rec.model_sha256),
        bundle_sha256=rec.bundle_sha256, size=rec.size, created_ms=rec.created_ms,
        metrics_json=json.dumps(rec.metrics, sort_keys=True), key_id=rec.key_id)
