"""Two model slots (A/B) under {data_dir}/slots/{a,b}/ and an atomically switched pointer.

Layout::

    slots/active        "a" or "b" (atomic replace): the slot the daemon runs
    slots/a/            verified files written by proto.bundle.write_staged (model, labels, manifest,
                        signature), bundle.kbundle (the signed bundle as received), slot.json
    slots/b/            the other slot: the previous model, or the one being staged

A slot is complete only when slot.json exists; it is written last. Staging always goes to
``slots/.staging`` first, is fsynced as a whole (files and directory, once) and only then renamed
into place, so a crash leaves the target slot either absent/old or complete. ``check()`` re-hashes
a slot's files against slot.json; with the trusted keys it also re-verifies the slot's signed
manifest (manifest.json + manifest.sig) against *today's* trust store and hashes every file against
that manifest, so a slot signed by a key removed since is no longer trusted (boot and rollback do
this).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

from edge.errors import SlotError
from proto import atomic
from proto import bundle as bundle_mod
from proto import manifest as manifest_mod
from proto.clock import now_ms
from proto.errors import BundleError

log = logging.getLogger("kestrel.updater")

SLOTS = ("a", "b")
RECORD = manifest_mod.SLOT_RECORD_NAME  # reserved by the verifier: never a payload file name
BUNDLE_FILE = manifest_mod.SLOT_BUNDLE_NAME
STAGING = ".staging"



def other(slot: str) -> str:
    return "b" if slot == "a" else "a"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Slot:
    def __init__(self, name: str, path: Path, record: Dict[str, Any]) -> None:
        self.name = name
        self.path = path
        self.record = record

    @property
    def model_name(self) -> str:
        return str(self.record["model_name"])

    @property
    def version(self) -> int:
        return int(self.record["version"])

    @property
    def model_path(self) -> Path:
        return self.path / str(self.record["model_file"])

    @property
    def model_sha256(self) -> str:
        return str(self.record["model_sha256"])

    @property
    def labels(self) -> List[str]:
        return [str(x) for x in self.record.get("labels", [])]

    @property
    def input_spec(self) -> Dict[str, Any]:
        return dict(self.record.get("input_spec") or {})

    def __repr__(self) -> str:
        return f"Slot({self.name}: {self.record.get('model_name')} v{self.record.get('version')})"


class SlotStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "slots"
        self.pointer = self.root / "active"

    # ---- reading ----
    def active_name(self) -> Optional[str]:
        try:
            name = self.pointer.read_text().strip()
        except FileNotFoundError:
            return None
        return name if name in SLOTS else None

    def slot(self, name: str) -> Optional[Slot]:
        path = self.root / name
        try:
            record = json.loads((path / RECORD).read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError) as exc:
            log.warning("slot %s has an unreadable record: %s", name, exc)
            return None
        return Slot(name, path, record)

    def active(self) -> Optional[Slot]:
        name = self.active_name()
        return self.slot(name) if name else None

    def inactive(self) -> Optional[Slot]:
        name = self.active_name()
        return self.slot(other(name)) if name else None

    def check(self, slot: Slot, trusted: Any = None) -> None:
        """Re-hash every file of the slot against its record; SlotError on any difference.

        With ``trusted`` (key id -> public key), first re-verify the slot's signed manifest with
        those keys (proto.bundle.verify_manifest: signature, schema; no model-name, time or version
        rule: the slot was admitted by those at install) and check every payload file's length and
        sha256 against it, and the record against the manifest.
        """
        files: Dict[str, str] = slot.record.get("files", {})
        if not files or slot.record.get("model_file") not in files:
            raise SlotError(f"slot {slot.name} has no file list")
        if trusted is not None:
            self._reverify(slot, trusted)
        for rel, want in files.items():
            p = slot.path / rel
            if not p.is_file() or p.is_symlink():
                raise SlotError(f"slot {slot.name}: {rel} is missing")
            got = sha256_file(p)
            if got != want:
                raise SlotError(f"slot {slot.name}: {rel} does not match its manifest hash")

    def _reverify(self, slot: Slot, trusted: Any) -> None:
        try:
            mb = bundle_mod.read_bounded(slot.path / manifest_mod.MANIFEST_NAME, manifest_mod.MAX_MANIFEST_BYTES)
            sb = bundle_mod.read_bounded(slot.path / manifest_mod.SIG_NAME, manifest_mod.MAX_SIG_BYTES)
        except BundleError as exc:  # unreadable or over the size limit
            detail = str(exc).replace(f"bundle refused: {exc.reason}: ", "", 1)
            raise SlotError(f"slot {slot.name}: its signed manifest cannot be used: {detail}") from exc
        try:
            man, _kid = bundle_mod.verify_manifest(mb, sb, trusted)
        except BundleError as exc:
            raise SlotError(f"slot {slot.name} is no longer trusted: {exc}") from exc
        rec = slot.record
        if (rec.get("model_name") != man.model_name or int(rec.get("version", -1)) != man.version
                or rec.get("model_file") != man.model_file
                or ("created" in rec and rec["created"] != man.created)):  # absent: staged before it was kept
            raise SlotError(f"slot {slot.name}: slot.json does not match its signed manifest")
        for name, ent in man.files.items():
            p = slot.path / name
            try:
                st = os.lstat(str(p))
            except OSError:
                raise SlotError(f"slot {slot.name}: {name} is missing") from None
            if not os.path.isfile(str(p)) or os.path.islink(str(p)) or st.st_size != ent.length:
                raise SlotError(f"slot {slot.name}: {name} is not the {ent.length}-byte file its manifest "
                                "lists")
            if rec.get("files", {}).get(name) != ent.sha256:
                raise SlotError(f"slot {slot.name}: slot.json does not match its signed manifest for {name}")

    # ---- writing ----
    def target_for_staging(self) -> str:
        """The slot a new model goes to: the one not active (or 'a' on a fresh device)."""
        name = self.active_name()
        return other(name) if name else "a"

    def stage(self, target: str, verified: Any, bundle_bytes: bytes) -> Slot:
        """Write a verified bundle into slot ``target`` (replacing what was there), crash-safely."""
        if target == self.active_name():
            raise SlotError(f"refusing to overwrite the active slot {target}")
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / STAGING
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        bundle_mod.write_staged(verified, staging)
        (staging / BUNDLE_FILE).write_bytes(bundle_bytes)
        manifest = verified.manifest
        model_sha = hashlib.sha256(verified.model_view).hexdigest()
        files: Dict[str, str] = {}
        model_file = str(_get(manifest, "model_file", ""))
        for dirpath, _dirs, names in os.walk(str(staging)):
            for n in names:
                p = Path(dirpath) / n
                rel = str(p.relative_to(staging))
                files[rel] = sha256_file(p)
                if not model_file and files[rel] == model_sha and rel != BUNDLE_FILE:
                    model_file = rel
        if model_file not in files:
            raise SlotError(f"staged bundle has no model file {model_file!r}")
        record = {
            "model_name": _get(manifest, "model_name"),
            "version": int(_get(manifest, "version")),
            "model_file": model_file,
            "model_sha256": model_sha,
            "bundle_sha256": getattr(verified, "bundle_sha256", ""),
            "key_id": getattr(verified, "key_id", ""),
            "labels": list(getattr(verified, "labels", None) or _get(manifest, "labels", [])),
            "input_spec": _spec_dict(_get(manifest, "input_spec", None) or _get(manifest, "input", None)),
            "default_threshold": _get(manifest, "default_threshold", None),
            "created": _get(manifest, "created", 0),  # signed; raises the time floor (engine.raise_floors)
            "files": files,
            "installed_ms": now_ms(),
        }
        from edge.updater.state import crash_point

        crash_point("STAGE_PARTIAL")  # tests: die with a half-written slot (no slot.json yet)
        atomic.write_json(staging / RECORD, record)
        atomic.fsync_tree(staging)  # the one fsync of the staged files (write_staged does not)
        dest = self.root / target
        if dest.exists():
            trash = self.root / f".old-{target}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(dest, trash)
            atomic.fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, dest)
        atomic.fsync_dir(self.root)
        slot = self.slot(target)
        assert slot is not None
        return slot

    def switch(self, target: str) -> None:
        """Atomically point the daemon at slot ``target`` (which must be complete)."""
        if self.slot(target) is None:
            raise SlotError(f"slot {target} is empty; nothing to switch to")
        atomic.write_bytes(self.pointer, (target + "\n").encode())

    def clear_pointer(self) -> None:
        """No active slot: the daemon starts on the factory model (model.path) again."""
        try:
            os.unlink(str(self.pointer))
        except FileNotFoundError:
            return
        atomic.fsync_dir(self.root)

    def clean_staging(self) -> None:
        for n in (STAGING, ".old-a", ".old-b"):
            shutil.rmtree(self.root / n, ignore_errors=True)


def _get(manifest: Any, key: str, default: Any = KeyError) -> Any:
    if isinstance(manifest, dict):
        if key in manifest:
            return manifest[key]
    elif hasattr(manifest, key):
        return getattr(manifest, key)
    if default is KeyError:
        raise SlotError(f"bundle manifest has no {key}")
    return default


def _spec_dict(spec: Any) -> Dict[str, Any]:
    if spec is None:
        return {}
    if hasattr(spec, "to_dict"):
        return dict(spec.to_dict())
    return dict(spec)
