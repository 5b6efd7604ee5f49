"""Signed desired-state messages for tests: what the hub's fleet key does (proto.desired), with the
sequence and expiry under the test's control."""

from __future__ import annotations

import itertools
import time
from typing import Any, Optional

from proto import desired, kestrel_pb2
from tests.helpers.bundles import KeyPair, make_keypair

_SEQ = itertools.count(int(time.time() * 1000))


def fleet_keypair(tmp_path: Any, name: str = "fleet") -> KeyPair:
    """A fleet key pair (``keys-{name}/{name}.key`` and ``.pub``), apart from any model-signing key."""
    return make_keypair(tmp_path, name=name)


def signed(topic: str, msg: kestrel_pb2.DesiredState, kp: KeyPair, *, sequence: Optional[int] = None,
           ttl_s: float = 3600.0, expires_ms: Optional[int] = None) -> bytes:
    """``msg`` signed for ``topic`` by ``kp`` (a fresh, increasing sequence unless given), serialized."""
    out = kestrel_pb2.DesiredState()
    out.CopyFrom(msg)
    desired.sign(topic, out, kp.key, sequence=next(_SEQ) if sequence is None else sequence,
                 expires_ms=expires_ms if expires_ms is not None else int((time.time() + ttl_s) * 1000))
    return out.SerializeToString()
