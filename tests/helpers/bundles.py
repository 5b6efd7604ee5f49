"""Signed bundles for tests (any suite): keys, bundles, and raw containers for attack tests.

    kp = make_keypair(tmp_path)                      # KeyPair: .key, .public, .key_id, .trusted, paths
    data = make_bundle(models_dir / "brightness_int8.tflite", kp, version=2)
    vb = verify_bundle(data, kp.trusted, now=time.time())

Self-test cases that must match the model's real outputs are computed by the trainer (running
the model on the edge runtime); here they are passed in as ``self_test=``.

Python 3.8 compatible.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from proto import bundle as bundlemod
from proto import keys as keymod
from proto.bundle_container import parse_container, write_container
from proto.inputspec import InputSpec

LABELS = ["bright", "dark", "mid"]
# The brightness_int8 test model: uint8 64x64 RGB input, [0, 1] scaled by 1/255.
BRIGHTNESS_SPEC = InputSpec(shape=[1, 64, 64, 3], dtype="uint8", scale=1.0 / 255.0, zero_point=0)
FAKE_MODEL = b"TFL3-not-really-a-model-" + bytes(range(256)) * 3


@dataclasses.dataclass
class KeyPair:
    priv_path: Path
    pub_path: Path
    key: keymod.SigningKey
    public: keymod.PublicKey
    key_id: str

    @property
    def trusted(self) -> Dict[str, keymod.PublicKey]:
        return {self.key_id: self.public}


def make_keypair(tmp_path: Path, name: str = "signing") -> KeyPair:
    """Generate a key pair under ``tmp_path/keys-{name}`` and load it back."""
    priv, pub = keymod.generate_keypair(Path(tmp_path) / f"keys-{name}", name=name)
    key = keymod.load_private_key(priv)
    public = key.public_key()
    return KeyPair(priv, pub, key, public, keymod.key_id(public))


def _key(key: Union[KeyPair, keymod.SigningKey]) -> keymod.SigningKey:
    return key.key if isinstance(key, KeyPair) else key


def make_bundle(
    model: Union[Path, str, bytes, None],
    key: Union[KeyPair, keymod.SigningKey],
    version: int = 1,
    name: str = "brightness",
    labels: Optional[List[str]] = None,
    spec: Optional[InputSpec] = None,
    self_test: Optional[Dict[str, Any]] = None,
    expires_in_s: float = 365 * 86400,
    created: Optional[float] = None,
    default_threshold: float = 0.6,
    metrics: Optional[Dict[str, Any]] = None,
    extra_files: Optional[Dict[str, bytes]] = None,
) -> bytes:
    """A signed bundle. ``model``: a .tflite path, raw bytes, or None for a tiny fake model."""
    if model is None:
        model_bytes = FAKE_MODEL
    elif isinstance(model, (bytes, bytearray)):
        model_bytes = bytes(model)
    else:
        model_bytes = Path(model).read_bytes()
    return bundlemod.build_bundle(
        model_bytes=model_bytes,
        labels=list(labels or LABELS),
        model_name=name,
        version=version,
        input_spec=spec or BRIGHTNESS_SPEC,
        signing_key=_key(key),
        default_threshold=default_threshold,
        metrics=metrics or {},
        self_test=self_test,
        expires_in_s=expires_in_s,
        created=time.time() if created is None else created,
        extra_files=extra_files or {},
    )


def write_bundle(path: Path, *args: Any, **kw: Any) -> Path:
    """``make_bundle(...)`` written to ``path``."""
    Path(path).write_bytes(make_bundle(*args, **kw))
    return Path(path)


# ---- raw containers for attack tests ---------------------------------------------------------


def members_of(data: bytes) -> List[Tuple[str, bytes]]:
    """The (name, bytes) members of a valid bundle, in order."""
    return [(name, bytes(content)) for name, content in parse_container(data)]


def tar_header(name: Union[str, bytes], size: int, typeflag: bytes = b"0", linkname: bytes = b"",
               prefix: bytes = b"", devmajor: int = 0, devminor: int = 0) -> bytes:
    """A ustar header with a correct checksum; any name/type (for building hostile containers).
    With the defaults it is byte-identical to the canonical header proto.bundle_container writes."""
    raw = name.encode() if isinstance(name, str) else name
    h = bytearray(512)
    h[0:len(raw[:100])] = raw[:100]
    h[100:108] = b"%07o\0" % 0o644
    h[108:116] = b"%07o\0" % 0
    h[116:124] = b"%07o\0" % 0
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % 0
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157:157 + len(linkname)] = linkname
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    if devmajor or devminor:
        h[329:337] = b"%07o\0" % devmajor
        h[337:345] = b"%07o\0" % devminor
    h[345:345 + len(prefix)] = prefix
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def raw_container(entries: List[Tuple[bytes, bytes]]) -> bytes:
    """Concatenate (header, content) entries with padding and the end-of-archive marker."""
    out = bytearray()
    for hdr, content in entries:
        out += hdr + content + b"\0" * ((-len(content)) % 512)
    out += b"\0" * 1024
    return bytes(out)


def rebuild(members: List[Tuple[str, bytes]]) -> bytes:
    """A canonical container holding ``members`` (no re-signing)."""
    return write_container(members)
