"""Ed25519 signing keys for model bundles: generate, load, sign, identify.

Files (see docs/bundle-format.md):

* ``signing.key``: the private key, PEM PKCS#8 (unencrypted), mode 0600. Stays on the signing
  machine (the trainer); loading refuses a file group/others can read.
* ``signing.pub``: the public key, one JSON line
  ``{"alg": "ed25519", "key_id": "<16 hex>", "public_key": "<base64 of the 32 raw bytes>"}``.
  Devices trust every ``*.pub`` in their trust directory.

``key_id`` is the first 16 hex digits of sha256(raw public key): a short, stable name a
signature carries so the verifier can pick the key (and so rotation needs no guessing).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Dict, Tuple, Union

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from proto.errors import KeyFileError

SigningKey = Ed25519PrivateKey
PublicKey = Ed25519PublicKey

ALG = "ed25519"
PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"
KEY_ID_HEX = 16
MAX_KEY_FILE_BYTES = 64 * 1024



def raw_public_bytes(pub: PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(pub: Union[PublicKey, SigningKey]) -> str:
    """First 16 hex digits of sha256(raw 32-byte public key). Accepts a private key too."""
    if isinstance(pub, Ed25519PrivateKey):
        pub = pub.public_key()
    return hashlib.sha256(raw_public_bytes(pub)).hexdigest()[:KEY_ID_HEX]


def public_key_text(pub: PublicKey) -> str:
    """The ``.pub`` file content for ``pub`` (one JSON line + newline)."""
    doc = {"alg": ALG, "key_id": key_id(pub), "public_key": base64.b64encode(raw_public_bytes(pub)).decode()}
    return json.dumps(doc, sort_keys=True) + "\n"


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never overwrite), atomically: temp file in the same dir, fsync, link."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(str(tmp), mode)
        os.link(str(tmp), str(path))  # fails if path exists: never clobber a key
    finally:
        try:
            os.unlink(str(tmp))
        except FileNotFoundError:
            pass


def generate_keypair(out_dir: Path, *, name: str = "signing") -> Tuple[Path, Path]:
    """Write ``{name}.key`` (PEM PKCS#8, 0600) and ``{name}.pub`` into ``out_dir``.

    Refuses to overwrite an existing key (a lost signing key cannot be recovered).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path = out_dir / f"{name}.key"
    pub_path = out_dir / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise KeyFileError(f"{p} already exists: refusing to overwrite a key; move it away first")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_new(priv_path, pem, 0o600)
    _write_new(pub_path, public_key_text(key.public_key()).encode(), 0o644)
    return priv_path, pub_path


def load_private_key(path: Union[str, Path]) -> SigningKey:
    """Load an Ed25519 PEM PKCS#8 private key; refuse one group/others may read."""
    p = Path(path)
    try:
        st = os.stat(str(p))
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {p}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"signing key {p} is not a regular file")
    if os.name == "posix" and st.st_mode & 0o077:
        raise KeyFileError(
            f"signing key {p} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):o}): "
            f"run `chmod 600 {p}`"
        )
    if st.st_size > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"signing key {p} is too large to be a key file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {p}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{p} is not an unencrypted PEM PKCS#8 private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{p} is not an Ed25519 key (got {type(key).__name__})")
    return key


def parse_public_key(text: Union[str, bytes], source: str = "public key") -> PublicKey:
    """Parse the ``.pub`` JSON format; the stored key_id must match the key."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{source}: not a Kestrel public key file (JSON): {exc}") from exc
    if not isinstance(doc, dict) or doc.get("alg") != ALG or not isinstance(doc.get("public_key"), str):
        raise KeyFileError(f"{source}: expected a JSON object with alg=ed25519, key_id and public_key")
    try:
        raw = base64.b64decode(doc["public_key"], validate=True)
        pub = Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise KeyFileError(f"{source}: public_key is not a base64 32-byte Ed25519 key") from exc
    kid = key_id(pub)
    if doc.get("key_id") != kid:
        raise KeyFileError(f"{source}: key_id {doc.get('key_id')!r} does not match the key ({kid})")
    return pub


def _load_pub_file(p: Path) -> PublicKey:
    try:
        if p.stat().st_size > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"{p} is too large to be a public key file")
        data = p.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {p}: {exc.strerror}") from exc
    return parse_public_key(data, str(p))


def load_public_keys(path: Union[str, Path]) -> Dict[str, PublicKey]:
    """Trusted keys by key_id from one ``.pub`` file or every ``*.pub`` in a directory."""
    p = Path(path)
    if p.is_dir():
        files = sorted(x for x in p.glob("*.pub") if x.is_file())
        if not files:
            raise KeyFileError(f"no trusted keys: {p} holds no *.pub file; copy the signer's .pub there")
    elif p.is_file():
        files = [p]
    else:
        raise KeyFileError(f"trusted key path {p} does not exist")
    keys: Dict[str, PublicKey] = {}
    for f in files:
        pub = _load_pub_file(f)
        keys[key_id(pub)] = pub
    return keys


def sign(key: SigningKey, data: bytes) -> Tuple[str, bytes]:
    """Sign ``data``; returns (key_id, 64-byte signature)."""
    return key_id(key), key.sign(data)
