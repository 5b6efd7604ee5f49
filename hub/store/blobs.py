"""Bundle blobs kept by the store itself (the registry's signed bundles, named by their sha256), so hub
workers that share a store need no shared folder (docs/adr/0022-hub-workers-and-blobs-in-the-store.md).

* :class:`FileBlobs` (the SQLite store): one file ``<sha256>.kbundle`` per blob in a directory next to the
  database (``<db file name>-bundles/``, beside its ``-images/`` segment files): written to a temp file of
  this process, fsynced, checked, ``os.replace``d, the directory fsynced. Hub workers sharing the SQLite
  file share the directory with it.
* :class:`GridBlobs` (the MongoDB store): GridFS bucket ``bundles``, one GridFS file per blob with the
  sha256 as its ``filename`` and a fresh ``_id`` per upload: an upload cut off by a crash leaves chunks no
  file document names (never read), and two workers storing the same blob at once both finish (either
  copy reads). The write concern of the store's database applies (majority, journaled).

Both check what they keep: the bytes must hash to the blob's name and have the announced length, else
StoreError and nothing is kept. Reads give a seekable reader (``read``, ``seek``, ``close``, a context
manager); a blob that is not there is :class:`~hub.errors.BundleBytesMissing`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

from hub.errors import BundleBytesMissing, StoreError, StoreUnavailable

log = logging.getLogger("hub.store.blobs")

SUFFIX = ".kbundle"
TEMP_PREFIX = ".put-"
COPY_CHUNK = 1024 * 1024
GRIDFS_BUCKET = "bundles"
_NAME = re.compile(r"^[0-9a-f]{64}$")


def check_name(sha256: str) -> str:
    if not isinstance(sha256, str) or not _NAME.match(sha256):
        raise StoreError(f"blob name {sha256!r} is not a sha256 (64 lowercase hex digits)")
    return sha256


def copy_checked(src: BinaryIO, write: Callable[[bytes], Any], sha256: str, size: int) -> None:
    """Copy ``size`` bytes from ``src`` through ``write``; StoreError when they are not ``size`` bytes
    hashing to ``sha256`` (the caller then drops what was written)."""
    digest = hashlib.sha256()
    n = 0
    while True:
        chunk = src.read(COPY_CHUNK)
        if not chunk:
            break
        n += len(chunk)
        if n > size:
            raise StoreError(f"blob {sha256[:16]}...: more than the announced {size} bytes; nothing kept")
        digest.update(chunk)
        write(chunk)
    if n != size or digest.hexdigest() != sha256:
        raise StoreError(f"blob {sha256[:16]}...: {n} bytes hashing to {digest.hexdigest()[:16]}..., not the "
                         f"announced {size} bytes of that sha256; nothing kept")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's process, alive
        return True
    return True


class FileBlobs:
    """Blobs as files in ``directory`` (created at the first write)."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self._remove_dead_temps()

    def path(self, sha256: str) -> Path:
        return self.dir / f"{check_name(sha256)}{SUFFIX}"

    def _remove_dead_temps(self) -> None:
        """Temp files of writes cut off by a crash (their process is gone; other workers' live ones stay)."""
        if not self.dir.is_dir():
            return
        for p in self.dir.glob(f"{TEMP_PREFIX}*"):
            try:
                pid = int(p.name[len(TEMP_PREFIX):].split("-", 1)[0])
            except ValueError:
                pid = -1
            if pid > 0 and _pid_alive(pid):
                continue
            try:
                p.unlink()
                log.info("removed the leftover of an interrupted blob write: %s", p)
            except OSError:  # pragma: no cover - another worker removed it first
                pass

    def put(self, sha256: str, src: BinaryIO, size: int) -> None:
        final = self.path(sha256)
        if final.exists():
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".tmp", dir=str(self.dir))
        except OSError as exc:
            raise StoreUnavailable(f"cannot write a blob into {self.dir}: {exc.strerror or exc}") from exc
        tmp = Path(tmp_name)

        def unavailable(exc: OSError) -> StoreUnavailable:
            return StoreUnavailable(f"cannot write blob {final}: {exc.strerror or exc}")

        def write(chunk: bytes) -> None:  # errors of our disk, not of the caller's source
            try:
                out.write(chunk)
            except OSError as exc:
                raise unavailable(exc) from exc

        try:
            with os.fdopen(fd, "wb") as out:
                copy_checked(src, write, sha256, size)
                try:
                    out.flush()
                    os.fsync(out.fileno())
                except OSError as exc:
                    raise unavailable(exc) from exc
            try:
                os.chmod(tmp, 0o644)
                os.replace(tmp, final)
                dfd = os.open(str(self.dir), os.O_RDONLY)
                try:
                    os.fsync(dfd)  # the name is durable before the caller records anything that points at it
                finally:
                    os.close(dfd)
            except OSError as exc:
                raise unavailable(exc) from exc
        finally:
            if tmp.exists():
                try:
                    tmp.unlink()
                except OSError:  # pragma: no cover
                    pass

    def open(self, sha256: str) -> BinaryIO:
        path = self.path(sha256)
        try:
            return path.open("rb")
        except FileNotFoundError:
            raise BundleBytesMissing(f"blob {sha256[:16]}... is not in {self.dir}") from None
        except OSError as exc:
            raise StoreError(f"cannot read blob {path}: {exc.strerror or exc}") from exc

    def has(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def delete(self, sha256: str) -> bool:
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot delete blob {self.path(sha256)}: {exc.strerror or exc}") from exc
        return True


class GridReader:
    """A GridFS file as a seekable reader; pymongo errors while reading become StoreUnavailable/StoreError."""

    def __init__(self, grid_out: Any, guard: Callable[[Callable[[], Any]], Any]) -> None:
        self._out = grid_out
        self._guard = guard

    def read(self, n: int = -1) -> bytes:
        return bytes(self._guard(lambda: self._out.read(n)))

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        return int(self._guard(lambda: self._out.seek(pos, whence)) or 0)

    def tell(self) -> int:
        return int(self._out.tell())

    def close(self) -> None:
        self._out.close()

    def __enter__(self) -> GridReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GridBlobs:
    """Blobs in GridFS bucket ``bundles`` of ``db`` (``guard`` translates pymongo errors, see hub.store.mongo)."""

    def __init__(self, db: Any, guard: Callable[[Callable[[], Any]], Any]) -> None:
        import gridfs

        self.fs = gridfs.GridFS(db, collection=GRIDFS_BUCKET)
        self._guard = guard

    def put(self, sha256: str, src: BinaryIO, size: int) -> None:
        check_name(sha256)
        if self.has(sha256):
            return

        def upload() -> None:
            grid_in = self.fs.new_file(filename=sha256, metadata={"sha256": sha256, "size": int(size)})
            try:
                copy_checked(src, grid_in.write, sha256, size)
            except BaseException:
                grid_in.abort()  # its chunks go; no file document names them
                raise
            grid_in.close()  # the file document last: until then no reader sees the blob
        self._guard(upload)

    def _last(self, sha256: str) -> Optional[Any]:
        from gridfs.errors import NoFile
        try:
            return self.fs.get_last_version(filename=check_name(sha256))
        except NoFile:
            return None

    def open(self, sha256: str) -> BinaryIO:
        out = self._guard(lambda: self._last(sha256))
        if out is None:
            raise BundleBytesMissing(f"blob {sha256[:16]}... is not in GridFS bucket {GRIDFS_BUCKET!r}")
        if int(out.length) != int((out.metadata or {}).get("size", out.length)):
            raise StoreError(f"blob {sha256[:16]}... in GridFS holds {out.length} bytes, not the "
                             f"{out.metadata.get('size')} it was stored with")
        return GridReader(out, self._guard)  # type: ignore[return-value]

    def has(self, sha256: str) -> bool:
        return bool(self._guard(lambda: self.fs.exists(filename=check_name(sha256))))

    def delete(self, sha256: str) -> bool:
        def gone() -> bool:
            ids = [f._id for f in self.fs.find({"filename": check_name(sha256)})]
            for file_id in ids:
                self.fs.delete(file_id)
            return bool(ids)
        return bool(self._guard(gone))


class BlobMethods:
    """The Store contract's blob methods (hub/store/base.py) for a store whose ``blobs`` is one of the above."""

    blobs: Any

    def put_blob(self, sha256: str, src: BinaryIO, size: int) -> None:
        self.blobs.put(sha256, src, size)

    def open_blob(self, sha256: str) -> BinaryIO:
        return self.blobs.open(sha256)  # type: ignore[no-any-return]

    def has_blob(self, sha256: str) -> bool:
        return bool(self.blobs.has(sha256))

    def delete_blob(self, sha256: str) -> bool:
        return bool(self.blobs.delete(sha256))
