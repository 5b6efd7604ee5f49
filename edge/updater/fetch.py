"""Device-side client of the hub's ModelRegistry.FetchModel: a resumable, verified download.

The bundle streams into ``{data_dir}/downloads/<name>-<version>.part`` (flushed and fsynced); a
broken stream or a restart resumes from the part file's size. The whole file must match the
sha256 from the desired state (or the server's, when the desired state has none). Bundles larger
than ``max_bundle_bytes`` are refused before a byte is downloaded when the size is announced, and
in any case as soon as the bytes received pass it. The signature is checked later by
proto.bundle.verify_bundle; this layer only moves bytes.

The channel is TLS, verifying the hub's certificate with the fleet CA (``[update] ca_file``, else
``[mqtt] ca_file``), and every call carries the device's token (``[update] token_file``, role
``device``: fetch only), both read at every download (a rotated token needs no restart). A refused
token or a failed TLS handshake ends the download at once (no quick retries: the hub's answer will
not change in seconds), as a HubError the follower retries later.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, Optional

from edge.credentials import credential_path, read_secret
from edge.errors import FetchError
from proto.errors import BundleError, ConfigError, HubError
from proto.hubcreds import Credentials

log = logging.getLogger("kestrel.updater")

RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 10.0
STREAM_TIMEOUT_S = 300.0


def part_path(downloads: Path, name: str, version: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return Path(downloads) / f"{safe}-{int(version)}.part"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()



def credentials(tls: bool, ca_file: str, token_file: str) -> Credentials:
    """What a download connects with: the token of ``token_file`` and the CA certificates of ``ca_file``
    (each looked up in $CREDENTIALS_DIRECTORY first when relative); ConfigError naming a bad file."""
    token = read_secret(token_file) or ""
    if not tls:
        return Credentials(token=token, token_file=token_file, plaintext=True)
    ca_pem = None
    if ca_file:
        path = credential_path(ca_file)
        try:
            ca_pem = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"[update] ca_file: cannot read {path}: {exc.strerror}") from exc
    return Credentials(token=token, token_file=token_file, ca_pem=ca_pem, ca_file=ca_file)


def _final(exc: Any, target: str, creds: Credentials) -> Optional[HubError]:
    """A HubError that ends the download now (a refused token, a failed TLS handshake), else None."""
    from proto.hubclient import tls_failure, tls_reason

    code = exc.code() if hasattr(exc, "code") else None
    name = getattr(code, "name", "")
    detail = " ".join(str(exc.details() if hasattr(exc, "details") else exc).split())
    if name in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return HubError(f"the hub at {target} refused our token ({name}: {detail}); check [update] token_file "
                        f"({creds.token_file or 'not set'}: the identity bundle's grpc-token, role device)")
    if name == "UNAVAILABLE" and not creds.plaintext and tls_failure(detail):
        return HubError(f"TLS with the hub at {target} failed ({tls_reason(detail)}): its certificate is not "
                        f"signed by {creds.ca_file or 'the system CAs'} or does not name it; check [update] ca_file")
    return None


def _too_large(name: str, version: int, n: int, limit: int) -> BundleError:
    return BundleError(f"bundle {name} v{version} is over max_bundle_bytes {limit} ({n} bytes or more); "
                       "refused", reason="too_large")


def _discard(part: Path) -> None:
    try:
        part.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", part, exc)


def _open_append(part: Path) -> BinaryIO:
    try:
        return open(part, "ab")  # noqa: SIM115 - the caller's with-block closes it
    except OSError as exc:
        raise FetchError(f"cannot write {part}: {exc.strerror or exc}") from exc


def fetch_bundle(target: str, name: str, version: int, *, downloads: Path, sha256: str = "", size: int = 0,
                 max_bundle_bytes: int, attempts: int = 5, chunk_size: int = 0,
                 stop: Optional[threading.Event] = None, creds: Optional[Credentials] = None) -> Path:
    """Download bundle ``name`` v``version`` from ``target`` (host:port) with ``creds`` (None: no token,
    TLS with the system's CAs); return the complete file.

    The size limit is enforced on every chunk (whatever the server announces), a resumed download
    whose whole-file hash does not match is discarded and fetched once more from the start (the
    part file may be a stale earlier build), and local write errors are FetchError.
    """
    import grpc

    from proto import kestrel_pb2, kestrel_pb2_grpc
    from proto.hubclient import call_metadata, channel

    creds = creds if creds is not None else Credentials()
    metadata = call_metadata(creds.token)

    if size and size > max_bundle_bytes:
        raise BundleError(f"bundle {name} v{version} is {size} bytes, over max_bundle_bytes "
                          f"{max_bundle_bytes}; refused before download", reason="too_large")
    if not target:
        raise HubError("no hub gRPC address: set [update] hub_grpc")
    downloads = Path(downloads)
    part = part_path(downloads, name, version)
    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create {downloads}: {exc.strerror or exc}") from exc
    want_sha = sha256.lower()
    delay = RETRY_INITIAL_S
    last_exc: Optional[Exception] = None
    restarted = False
    for _attempt in range(max(1, attempts)):
        if stop is not None and stop.is_set():
            raise HubError("download stopped")
        offset = part.stat().st_size if part.exists() else 0
        if (size and offset > size) or offset > max_bundle_bytes:
            _discard(part)
            offset = 0
        resumed = offset > 0
        total = size
        try:
            with channel(target, creds) as ch:
                stub = kestrel_pb2_grpc.ModelRegistryStub(ch)
                req = kestrel_pb2.FetchRequest(model_name=name, version=int(version), offset=offset,
                                               chunk_size=chunk_size)
                with _open_append(part) as fh:
                    for chunk in stub.FetchModel(req, timeout=STREAM_TIMEOUT_S, metadata=metadata):
                        if chunk.total_size:
                            announced = int(chunk.total_size)
                            if announced > max_bundle_bytes:
                                raise _too_large(name, version, announced, max_bundle_bytes)
                            if size and announced != size:
                                raise HubError(f"hub announced {announced} bytes, the desired state {size}")
                            total = announced
                        if chunk.sha256 and not want_sha:
                            want_sha = chunk.sha256.lower()
                        if int(chunk.offset) != offset:
                            raise HubError(f"hub sent offset {chunk.offset}, expected {offset}")
                        n = len(chunk.data)
                        if offset + n > max_bundle_bytes:
                            raise _too_large(name, version, offset + n, max_bundle_bytes)
                        if total and offset + n > total:
                            raise HubError(f"hub sent more than the {total} bytes it announced")
                        try:
                            fh.write(chunk.data)
                        except OSError as exc:
                            raise FetchError(f"cannot write {part}: {exc.strerror or exc}") from exc
                        offset += n
                    try:
                        fh.flush()
                        os.fsync(fh.fileno())
                    except OSError as exc:
                        raise FetchError(f"cannot write {part}: {exc.strerror or exc}") from exc
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.NOT_FOUND:
                raise BundleError(f"the hub has no bundle {name} v{version}", reason="not_found") from exc
            final = _final(exc, target, creds)
            if final is not None:
                raise final from exc
            last_exc = exc
            log.warning("fetch %s v%s interrupted at %d bytes (%s); resuming", name, version,
                        part.stat().st_size if part.exists() else 0, code)
            if stop is not None and stop.wait(delay):
                raise HubError("download stopped") from exc
            if stop is None:
                time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
            continue
        except (BundleError, FetchError):
            _discard(part)
            raise
        except HubError as exc:
            _discard(part)
            last_exc = exc
            continue
        if total and offset < total:
            last_exc = HubError(f"stream ended at {offset} of {total} bytes")
            continue
        got = _sha256_file(part)
        if want_sha and got != want_sha:
            _discard(part)
            if resumed and not restarted:
                log.warning("resumed download of %s v%s does not match its hash; fetching it again from the "
                            "start", name, version)
                restarted = True
                continue
            raise BundleError(f"downloaded bundle {name} v{version} has sha256 {got[:12]}..., the hub "
                              f"announced {want_sha[:12]}...; discarded", reason="hash_mismatch")
        return part
    raise HubError(f"could not fetch {name} v{version} from {target} after {attempts} attempts: {last_exc}")
