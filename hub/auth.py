"""API tokens and roles: one token system for the dashboard, its API and the gRPC services
(docs/security.md "Tokens and roles", docs/dashboard.md, ADRs 0016 and 0019).

A token is 32 random bytes (``kst_`` + URL-safe base64), shown once when it is made; the store keeps
only its sha256 (hub/store/authrecords.py), so several hubs sharing a store share the tokens and a
copy of the database lets nobody in. A slow password hash would add nothing: a token is not a
password a person chose, and 256 random bits cannot be guessed from their hash.

Roles are a table of permissions, not a ladder: the people's four form one (viewer < labeller <
operator < admin), the machines' two are beside it: a ``trainer`` may push models (and list them, to
pick the next version), a ``device`` may fetch them and nothing else (``kestrel-hub devices add``
makes one per device, ``device.<NAME>``, for its identity bundle). The gRPC methods' permissions are
in hub/grpc_auth.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Optional

from hub.errors import AuthError as AuthError  # defined in hub.errors, importable from here too
from hub.errors import ConfigError
from hub.store.authrecords import TokenRecord
from hub.store.base import Store
from proto import atomic, hubcreds

log = logging.getLogger(__name__)

# permissions
READ = "read"          # see the fleet, frames, models, charts
LABEL = "label"        # set and clear labels
DEPLOY = "deploy"      # deploy and roll back
ADMIN = "admin"        # manage tokens
MODELS = "models"      # list the registry's model versions (gRPC ListModels)
PUSH = "push"          # push a signed bundle into the registry (gRPC PushModel)
FETCH = "fetch"        # download a bundle (gRPC FetchModel)

ROLES: Dict[str, FrozenSet[str]] = {
    "viewer": frozenset({READ, MODELS}),
    "labeller": frozenset({READ, LABEL, MODELS}),
    "operator": frozenset({READ, LABEL, DEPLOY, MODELS}),
    "admin": frozenset({READ, LABEL, DEPLOY, ADMIN, MODELS, PUSH, FETCH}),
    "trainer": frozenset({PUSH, MODELS}),
    "device": frozenset({FETCH}),
}
DEVICE_ROLE = "device"
DEVICE_TOKEN_PREFIX = "device."  # + the device's name: the token `kestrel-hub devices add` makes
TOKEN_PREFIX = "kst_"
TOKEN_BYTES = 32
ADMIN_TOKEN_FILE = "admin-token"   # in data_dir, 0600: the first admin token of a fresh store
ADMIN_TOKEN_NAME = "admin"
NAME_MAX = 80  # a device token's name is "device." + a device name of up to 64


@dataclass(frozen=True)
class Principal:
    """Who is asking, and what they may do."""
    name: str                      # the token's name ("" = anonymous)
    role: str                      # "" = anonymous
    permissions: FrozenSet[str]

    def can(self, permission: str) -> bool:
        return permission in self.permissions


ANONYMOUS = Principal("", "", frozenset())
ANONYMOUS_READER = Principal("", "", frozenset({READ}))  # [http] auth_reads = false


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def check_role(role: str) -> str:
    if role not in ROLES:
        raise AuthError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    return role


def check_name(name: str) -> str:
    if not name or len(name) > NAME_MAX or not all(c.isalnum() or c in "._-@" for c in name):
        raise AuthError(f"invalid token name {name!r}: 1-{NAME_MAX} letters, digits, '.', '_', '-', '@' (it is "
                        "recorded with every label)")
    return name


def principal_of(rec: Optional[TokenRecord]) -> Optional[Principal]:
    """The principal of an active token record with a known role; None otherwise."""
    if rec is None or not rec.active or rec.role not in ROLES:
        return None
    return Principal(rec.name, rec.role, ROLES[rec.role])


def authenticate(store: Store, token: str) -> Optional[Principal]:
    """The principal a token stands for, or None (unknown, revoked, or not a token at all)."""
    if not token or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    return principal_of(store.find_token(hash_token(token)))


def add_token(store: Store, name: str, role: str, clock: Callable[[], float] = time.time) -> str:
    """Make a token; returns its text (the only time it exists anywhere). AuthError if the name is taken."""
    check_name(name)
    check_role(role)
    token = new_token()
    if not store.add_token(TokenRecord(name, role, hash_token(token), int(clock() * 1000))):
        raise AuthError(f"a token named {name!r} exists already; revoke it first or choose another name")
    return token


def revoke_token(store: Store, name: str, clock: Callable[[], float] = time.time) -> None:
    if not store.revoke_token(name, int(clock() * 1000)):
        raise AuthError(f"no active token is named {name!r} (see `kestrel-hub tokens list`)")


def list_tokens(store: Store) -> List[TokenRecord]:
    return store.list_tokens()


def device_token_name(device_id: str) -> str:
    return DEVICE_TOKEN_PREFIX + device_id


def replace_device_token(store: Store, device_id: str, clock: Callable[[], float] = time.time) -> str:
    """A new ``device`` token for ``device_id`` (its previous one, if any, revoked); returns its text."""
    name = device_token_name(device_id)
    store.revoke_token(name, int(clock() * 1000))  # False when there was none: fine
    return add_token(store, name, DEVICE_ROLE, clock)


def revoke_device_token(store: Store, device_id: str, clock: Callable[[], float] = time.time) -> bool:
    return bool(store.revoke_token(device_token_name(device_id), int(clock() * 1000)))


def ensure_admin_token(store: Store, data_dir: Path, clock: Callable[[], float] = time.time) -> Optional[Path]:
    """A store with no active token of a person (the devices' tokens of `kestrel-hub devices add` do not
    count) gets an admin token, written to ``<data_dir>/admin-token`` (0600); returns that path when it
    made one, None when the store has such a token already (then the file, if any, is left alone). The
    token itself is never logged."""
    if any(t.active and t.role != DEVICE_ROLE for t in store.list_tokens()):
        return None
    name = ADMIN_TOKEN_NAME  # a revoked "admin" is replaced (Store.add_token)
    token = new_token()
    if not store.add_token(TokenRecord(name, "admin", hash_token(token), int(clock() * 1000))):
        return None  # another hub sharing this store made one at the same moment
    path = data_dir / ADMIN_TOKEN_FILE
    try:
        atomic.write_text(path, token + "\n", mode=0o600)
        os.chmod(path, 0o600)  # an existing file keeps the mode it had otherwise
    except OSError as exc:
        store.revoke_token(name, int(clock() * 1000))  # a token nobody can read must not stay active
        raise ConfigError(f"cannot write the first admin token to {path}: {exc.strerror}; make data_dir "
                          "writable") from exc
    return path


def read_token_file(path: str) -> str:
    """The token in a file (first line, stripped); ConfigError saying what is wrong otherwise
    (proto.hubcreds.read_token_file, shared with kestrel-train)."""
    return hubcreds.read_token_file(path)
