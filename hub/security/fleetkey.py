"""The fleet key: an Ed25519 key of its own (never the model-signing key) that signs every desired
state the hub publishes (proto.desired). ``fleet.key`` (0600) and ``fleet.pub`` live in the security
directory unless ``[security] fleet_key_file`` names the operator's; devices trust ``fleet.pub``
(``[update] fleet_keys``, shipped in every identity bundle).

Sequences come from one counter per key directory, ``fleet.seq``: never below the wall clock in
milliseconds and always above the last one issued (persisted before the message is published), so
they only go up across restarts, and a hub whose clock stepped back still issues higher ones.
``fleet-signed.json`` remembers, per topic, the last message signed for it: the renewer
(hub.security.refresh) re-signs a retained message only when it is exactly that one, so it never
re-signs a forged or replayed message it finds on a broker.

Rotation (``kestrel-hub fleet-key rotate|finish``): ``rotate`` creates the next key
(``fleet-next.key``); from then on ``public_text`` (what identity bundles ship as ``fleet.pub``)
holds both public keys, one JSON line each, so devices given it trust both. ``finish`` makes the
next key the fleet key (the old one goes to ``retired/``); the renewer then re-signs every retained
message of ours with it at once.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict

from hub.errors import SecurityError
from proto import atomic, desired
from proto.clock import now_ms
from proto.errors import KeyFileError
from proto.keys import SigningKey, generate_keypair, key_id, load_private_key, public_key_text

FLEET_KEY = "fleet.key"
FLEET_PUB = "fleet.pub"
SEQUENCE_FILE = "fleet.seq"
SIGNED_FILE = "fleet-signed.json"  # topic -> digest of the last message signed for it
NEXT_NAME = "fleet-next"  # fleet-next.key / fleet-next.pub while a rotation runs
RETIRED_DIR = "retired"


class FleetSigner:
    def __init__(self, directory: Path, key_file: str = "", ttl_s: float = 7 * 86400.0) -> None:
        self.dir = Path(directory)
        self.ttl_ms = int(ttl_s * 1000)
        path = Path(key_file) if key_file else self.dir / FLEET_KEY
        if not key_file and not path.exists():
            try:
                generate_keypair(self.dir, name="fleet")
            except KeyFileError as exc:
                raise SecurityError(f"cannot create the fleet key in {self.dir}: {exc}") from exc
        try:
            self.key: SigningKey = load_private_key(path)
        except KeyFileError as exc:
            raise SecurityError(f"fleet key: {exc} (see [security] fleet_key_file)") from exc
        self.key_path = path
        self.key_id = key_id(self.key)
        self.public_text = public_key_text(self.key.public_key())
        nxt = path.parent / f"{NEXT_NAME}.key"
        if nxt.exists():
            try:
                self.public_text += public_key_text(load_private_key(nxt).public_key())
            except KeyFileError as exc:
                raise SecurityError(f"the next fleet key: {exc}") from exc
        self._seq_path = path.parent / SEQUENCE_FILE
        self._signed_path = path.parent / SIGNED_FILE
        self._lock = threading.Lock()

    def next_sequence(self) -> int:
        with self._lock:
            try:
                last = int(self._seq_path.read_text().strip() or 0)
            except FileNotFoundError:
                last = 0
            except (OSError, ValueError) as exc:
                raise SecurityError(f"{self._seq_path} is unreadable ({exc}); it must hold the last sequence "
                                    "issued (a number): restore it or write a larger one") from exc
            seq = max(now_ms(), last + 1)
            atomic.write_text(self._seq_path, f"{seq}\n")
            return seq

    def sign(self, topic: str, msg: Any) -> Any:
        """Sign ``msg`` (a DesiredState, in place) for ``topic`` with a fresh sequence and expiry."""
        return desired.sign(topic, msg, self.key, sequence=self.next_sequence(),
                            expires_ms=now_ms() + self.ttl_ms)

    def published(self, topic: str, msg: Any) -> None:
        """``msg`` is now the retained message on ``topic`` (the broker acknowledged it): the last
        message of ours there, the only one the renewer will sign again."""
        with self._lock:
            signed = self._signed()
            signed[topic] = desired.digest(topic, msg)
            atomic.write_json(self._signed_path, signed)

    def last_signed(self, topic: str) -> str:
        """The digest (proto.desired.digest) of the last message signed for ``topic`` ("" = none)."""
        with self._lock:
            return str(self._signed().get(topic, ""))

    def _signed(self) -> Dict[str, str]:
        try:
            data = json.loads(self._signed_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise SecurityError(f"{self._signed_path} is unreadable ({exc}): remove it (retained desired state "
                                "is then renewed only after its next deploy)") from exc
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def rotate(directory: Path) -> str:
    """Create the next fleet key (refused while one exists); returns its key id."""
    directory = Path(directory)
    if (directory / f"{NEXT_NAME}.key").exists():
        raise SecurityError("a fleet key rotation is running already: `kestrel-hub fleet-key finish` it first")
    try:
        priv, _ = generate_keypair(directory, name=NEXT_NAME)
    except KeyFileError as exc:
        raise SecurityError(f"cannot create the next fleet key: {exc}") from exc
    return key_id(load_private_key(priv))


def finish(directory: Path) -> str:
    """The next key becomes the fleet key; the old one goes to ``retired/``. Returns the new key id."""
    directory = Path(directory)
    nxt_key, nxt_pub = directory / f"{NEXT_NAME}.key", directory / f"{NEXT_NAME}.pub"
    if not nxt_key.exists():
        raise SecurityError("no fleet key rotation is running (`kestrel-hub fleet-key rotate` starts one)")
    retired = directory / RETIRED_DIR
    retired.mkdir(mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for name in (FLEET_KEY, FLEET_PUB):
        if (directory / name).exists():
            os.replace(str(directory / name), str(retired / f"{stamp}-{name}"))
    os.replace(str(nxt_pub), str(directory / FLEET_PUB))
    os.replace(str(nxt_key), str(directory / FLEET_KEY))
    atomic.fsync_dir(directory)
    return key_id(load_private_key(directory / FLEET_KEY))
