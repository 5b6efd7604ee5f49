"""Signed desired state: what the hub's fleet key signs in a ``DesiredState`` and how a device checks it.

The hub signs every deploy and rollback it publishes on ``kestrel/v1/devices/{id}/desired`` or
``kestrel/v1/groups/{group}/desired`` with its **fleet key** (Ed25519, a key of its own: never the
model-signing key, and devices keep the two trust sets apart). What is signed::

    b"kestrel-desired-v1\\n" + canonical_json({"topic": ..., every DesiredState field but signature})

The topic is part of it, so a message signed for one group (or device) is refused on any other
topic. ``sequence`` orders the messages of one topic (a device keeps the highest it accepted per
topic, persisted, and refuses anything not above it unless it is that very message again: a
retained message is redelivered on every reconnect); ``expires_ms`` bounds how long a captured
message can be replayed to a device that never saw a newer one (the hub re-signs its retained
messages before they expire). ``verify`` is a pure function: the caller brings the trusted keys,
the time and the replay state.

Canonical JSON is proto.manifest's (sorted keys, no whitespace, UTF-8). A new DesiredState field
that must be signed changes the domain tag (``kestrel-desired-v2``): a device never accepts a
message whose meaning it cannot fully check.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, Mapping

from cryptography.exceptions import InvalidSignature

from proto.errors import DesiredRefused
from proto.keys import PublicKey, SigningKey, key_id
from proto.manifest import canonical_json

DOMAIN = b"kestrel-desired-v1\n"
SIGNATURE_BYTES = 64

# Why a device refused a desired-state message (telemetry ``desired_refused`` keys, Prometheus labels).
UNSIGNED = "unsigned"              # no signature (also: an empty, "clearing" retained message)
NO_FLEET_KEY = "no_fleet_key"      # the device trusts no fleet key, so it cannot check any message
UNTRUSTED_KEY = "untrusted_key"    # signed by a key the device does not trust
BAD_SIGNATURE = "bad_signature"    # the signature does not match: altered, or signed for another topic
EXPIRED = "expired"                # past expires_ms (beyond the clock slack)
REPLAYED = "replayed"              # sequence not above the last one accepted on this topic
MALFORMED = "malformed"            # not a DesiredState at all
REASONS = (UNSIGNED, NO_FLEET_KEY, UNTRUSTED_KEY, BAD_SIGNATURE, EXPIRED, REPLAYED, MALFORMED)

SIGNED_FIELDS = ("model_name", "version", "sha256", "size", "issued_ms", "rollback", "grpc_target",
                 "rollback_from_version", "sequence", "expires_ms", "key_id")


def signed_fields(topic: str, msg: Any) -> Dict[str, Any]:
    """The values the signature covers, as plain JSON types."""
    out: Dict[str, Any] = {"topic": topic}
    for name in SIGNED_FIELDS:
        value = getattr(msg, name)
        out[name] = value if isinstance(value, (str, bool)) else int(value)
    return out


def signed_bytes(topic: str, msg: Any) -> bytes:
    """The exact bytes the fleet key signs for ``msg`` published on ``topic``."""
    return DOMAIN + canonical_json(signed_fields(topic, msg))


def digest(topic: str, msg: Any) -> str:
    """A short name of one signed message (sha256 of its signed bytes and signature): tells the same
    retained message redelivered from a different message carrying the same sequence."""
    return hashlib.sha256(signed_bytes(topic, msg) + bytes(msg.signature)).hexdigest()[:32]


def sign(topic: str, msg: Any, key: SigningKey, *, sequence: int, expires_ms: int) -> Any:
    """Set ``sequence``, ``expires_ms``, ``key_id`` and ``signature`` on ``msg`` (in place); returns it."""
    msg.sequence = int(sequence)
    msg.expires_ms = int(expires_ms)
    msg.key_id = key_id(key)
    msg.signature = key.sign(signed_bytes(topic, msg))
    return msg


def verify(topic: str, msg: Any, keys: Mapping[str, PublicKey], *, now_ms: int, slack_ms: int = 0) -> str:
    """Check the signature and the expiry of ``msg`` received on ``topic``; return the key id that
    signed it. DesiredRefused(reason) otherwise (reasons above; the replay check is the caller's,
    which keeps the per-topic state)."""
    if not msg.signature:
        raise DesiredRefused(UNSIGNED, "the message is not signed")
    if not keys:
        raise DesiredRefused(NO_FLEET_KEY, "no fleet key is trusted, so no signature can be checked")
    pub = keys.get(msg.key_id)
    if pub is None:
        raise DesiredRefused(UNTRUSTED_KEY, f"signed by key {msg.key_id[:32]!r}, which is not a trusted fleet key")
    if len(msg.signature) != SIGNATURE_BYTES:
        raise DesiredRefused(BAD_SIGNATURE, "the signature is not 64 bytes")
    try:
        pub.verify(bytes(msg.signature), signed_bytes(topic, msg))
    except InvalidSignature:
        raise DesiredRefused(BAD_SIGNATURE, f"the signature does not match this message on {topic} "
                                            "(altered, or signed for another topic)") from None
    if int(msg.expires_ms) + int(slack_ms) < int(now_ms):
        raise DesiredRefused(EXPIRED, f"expired at {int(msg.expires_ms)} (now {int(now_ms)})")
    return str(msg.key_id)
