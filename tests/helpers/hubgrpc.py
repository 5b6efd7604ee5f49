"""The hub's gRPC services in the test process, behind the real token check (hub/grpc_auth.py) against the
test's store: an admin token is made in the store, the client carries it. ``tls`` (default: a plain-text
loopback port, which make_server allows only there) is (key PEM, certificate PEM), e.g. of
hub.security.enrol.Security.grpc_tls()."""

from __future__ import annotations

from typing import Any, Optional, Tuple

from hub import auth
from hub.grpc_auth import GrpcAuth
from hub.grpc_service import make_server
from proto.hubclient import HubClient
from proto.hubcreds import Credentials


def store_auth(store: Any) -> GrpcAuth:
    return GrpcAuth(lambda token: auth.authenticate(store, token))


def admin_token(store: Any, name: str = "test-admin") -> str:
    existing = store.get_token(name)
    if existing is not None and existing.active:
        store.revoke_token(name, 1)
    return auth.add_token(store, name, "admin")


def serve(reg: Any, fleet: Any, store: Any, *, max_workers: int = 4,
          tls: Optional[Tuple[bytes, bytes]] = None) -> Tuple[Any, int, Credentials]:
    """(started server, port, Credentials of an admin token for it)."""
    server, port, _ = make_server(reg, fleet, port=0, max_workers=max_workers, auth=store_auth(store), tls=tls)
    server.start()
    return server, port, Credentials(token=admin_token(store), plaintext=tls is None)


def client(port: int, creds: Credentials, timeout_s: float = 20.0) -> HubClient:
    return HubClient(f"127.0.0.1:{port}", timeout_s=timeout_s, creds=creds)


def metadata(creds: Credentials) -> Tuple[Tuple[str, str], ...]:
    return (("authorization", f"Bearer {creds.token}"),)
