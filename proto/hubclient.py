"""The gRPC client of the hub's services (ModelRegistry, Fleet), shared by ``kestrel-hub``'s fleet commands
(hub.cli.fleet), ``kestrel-train push``/``push-model`` (trainer/push.py, which may not import hub) and the demo.
It lives in proto/ because every side imports proto: Python 3.8, no TensorFlow.

TLS, verifying the hub's certificate with the fleet CA (proto.hubcreds.Credentials: the CA file, else the
system's CAs), and the token as ``authorization: Bearer <token>`` on every call; a plain-text channel only
when asked for, and then with a token only to a loopback address (the hub's ``[grpc] plain_port``). A
deadline on every call (a push's grows with its size), and grpc.RpcError turned into ours:

* the hub answered and refused (INVALID_ARGUMENT: tampered / cut off / wrong hash, FAILED_PRECONDITION:
  untrusted key / not newer, ALREADY_EXISTS, NOT_FOUND, OUT_OF_RANGE; UNAUTHENTICATED: no or an unknown
  token; PERMISSION_DENIED: the token's role may not do this) -> :class:`HubRefused`, an ArtifactError:
  retrying the same request will not help (the CLIs exit 2);
* the TLS handshake failed (the hub's certificate is not signed by the CA we trust, does not name the
  address we dialled, or the port does not speak TLS) -> :class:`HubTlsError`, an ArtifactError too
  (exit 2): the CA file or the address is wrong, retrying will not help;
* unreachable, deadline exceeded, or a server-side failure -> proto.errors.HubError, a TransportError
  (exit 3): retrying later may help.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import grpc

from proto import kestrel_pb2, kestrel_pb2_grpc
from proto.errors import ConfigError, HubError, HubRefused, HubTlsError
from proto.hubcreds import CA_HELP, TOKEN_HELP, Credentials, is_loopback

T = TypeVar("T")

DEFAULT_HUB = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 30.0              # deadline of every call but a push ...
PUSH_TIMEOUT_S = 60.0                 # ... a push gets this base ...
PUSH_BYTES_PER_S = 1024 * 1024        # ... plus one second per MiB (a 200 MiB bundle gets 260 s)
PUSH_CHUNK = 256 * 1024
MAX_MESSAGE = 8 * 1024 * 1024

REFUSALS = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION", "ALREADY_EXISTS", "NOT_FOUND", "OUT_OF_RANGE",
                      "UNAUTHENTICATED", "PERMISSION_DENIED"})
# What grpc's core says in an UNAVAILABLE status when the TLS handshake, not the network, failed.
TLS_FAILURE_MARKS = ("handshake", "certificate_verify_failed", "ssl_error", "tsi_", "wrong_version_number",
                     "peer name", "alpn")
_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]


def tls_failure(detail: str) -> bool:
    """Whether an UNAVAILABLE status's detail says the TLS handshake failed."""
    low = detail.lower()
    return any(m in low for m in TLS_FAILURE_MARKS)


def tls_reason(detail: str) -> str:
    """The OpenSSL reason of a failed handshake (CERTIFICATE_VERIFY_FAILED, WRONG_VERSION_NUMBER ...)."""
    found = re.search(r"OPENSSL_internal:([A-Z0-9_]+)", detail) or re.search(r"\((TSI_[A-Z_]+)\)", detail)
    return found.group(1) if found else "handshake failed"


def wrap_rpc_error(exc: Any, what: str, hub: str, creds: Optional[Credentials] = None) -> Exception:
    """grpc.RpcError -> HubRefused (the hub said no), HubTlsError (we do not trust the hub's certificate)
    or HubError (could not get an answer). ``creds`` (what we connected with) makes the hints exact."""
    code = exc.code() if hasattr(exc, "code") else None
    name = getattr(code, "name", "UNKNOWN")
    detail = " ".join(str(exc.details() if hasattr(exc, "details") else exc).split())
    if name == "UNAUTHENTICATED" and creds is not None:
        if not creds.token:
            detail = f"no token was sent: give one with {TOKEN_HELP}"
        elif creds.token_file:
            detail += f" (the token of {creds.token_file})"
    if name in REFUSALS:
        return HubRefused(name, detail, f"{what} at hub {hub}")
    if name == "UNAVAILABLE" and not (creds is not None and creds.plaintext) and tls_failure(detail):
        trusted = f"the CA in {creds.ca_file}" if creds is not None and creds.ca_file else "the system's CAs"
        return HubTlsError(f"{what}: TLS with hub at {hub} failed ({tls_reason(detail)}): its certificate is not "
                           f"signed by {trusted} or does not name {hub.rpartition(':')[0] or hub}, or the port "
                           f"speaks no TLS; pass the hub's fleet CA: {CA_HELP}")
    if name == "UNAVAILABLE":
        plain = " (with --plaintext: is it the TLS port?)" if creds is not None and creds.plaintext else ""
        return HubError(f"{what}: hub at {hub} is unreachable or cannot serve it ({detail}); is "
                        f"`kestrel-hub serve` running and --hub right?{plain}")
    if name == "DEADLINE_EXCEEDED":
        return HubError(f"{what}: hub at {hub} did not answer in time (deadline exceeded)")
    return HubError(f"{what} at hub {hub} failed ({name}): {detail}")


def channel(hub: str, creds: Optional[Credentials] = None, options: Sequence[Tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to ``hub``: TLS verified with ``creds.ca_pem`` (None = the system's CAs), or plain text when
    ``creds.plaintext`` (refused with a token to anything but a loopback address)."""
    creds = creds if creds is not None else Credentials()
    opts = list(_OPTIONS) + list(options)
    if creds.plaintext:
        if creds.token and not is_loopback(hub):
            raise ConfigError(f"refusing to send a hub token in plain text to {hub}: plain text is for the hub's "
                              "loopback port ([grpc] plain_port); drop --plaintext to use TLS")
        return grpc.insecure_channel(hub, options=opts)
    return grpc.secure_channel(hub, grpc.ssl_channel_credentials(root_certificates=creds.ca_pem), options=opts)


def call_metadata(token: str) -> Tuple[Tuple[str, str], ...]:
    """The metadata that carries a token (the hub's interceptor reads it: hub/grpc_auth.py)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def push_timeout(size: int) -> float:
    """The deadline for pushing ``size`` bytes: a base plus a floor on the transfer rate."""
    return PUSH_TIMEOUT_S + size / PUSH_BYTES_PER_S


def push_chunks(data: bytes, size: int = PUSH_CHUNK) -> Iterator[kestrel_pb2.PushChunk]:
    """PushModel's request stream: the first chunk carries the total size and the sha256 (an empty bundle is
    one empty chunk, which the hub refuses)."""
    digest = hashlib.sha256(data).hexdigest()
    for off in range(0, max(len(data), 1), size):
        if off == 0:
            yield kestrel_pb2.PushChunk(data=data[:size], total_size=len(data), sha256=digest)
        else:
            yield kestrel_pb2.PushChunk(data=data[off:off + size])


class HubClient:
    """``creds``: the token and the CA (proto.hubcreds.load); None = no token, TLS with the system's CAs."""

    def __init__(self, target: str = DEFAULT_HUB, timeout_s: float = DEFAULT_TIMEOUT_S,
                 creds: Optional[Credentials] = None) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.creds = creds if creds is not None else Credentials()
        self.metadata = call_metadata(self.creds.token)
        self.channel = channel(target, self.creds)
        self.registry = kestrel_pb2_grpc.ModelRegistryStub(self.channel)
        self.fleet = kestrel_pb2_grpc.FleetStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except grpc.RpcError as exc:
            raise wrap_rpc_error(exc, what, self.target, self.creds) from exc

    # ---- registry ----
    def push(self, data: bytes, chunk_size: int = PUSH_CHUNK,
             timeout_s: Optional[float] = None) -> kestrel_pb2.PushResult:
        """PushModel; the deadline is push_timeout(len(data)) unless given."""
        deadline = timeout_s or push_timeout(len(data))
        return self._call("PushModel", lambda: self.registry.PushModel(push_chunks(data, chunk_size), timeout=deadline,
                                                                      metadata=self.metadata))

    def list_models(self, model_name: str = "") -> List[kestrel_pb2.ModelVersion]:
        resp = self._call("ListModels", lambda: self.registry.ListModels(
            kestrel_pb2.ListModelsRequest(model_name=model_name), timeout=self.timeout_s, metadata=self.metadata))
        return list(resp.versions)

    def fetch(self, model_name: str, version: int = 0, offset: int = 0, chunk_size: int = 0,
              timeout_s: Optional[float] = None) -> bytes:
        """The bundle bytes from ``offset``; checks the whole-bundle sha256 when starting at 0."""
        req = kestrel_pb2.FetchRequest(model_name=model_name, version=version, offset=offset,
                                       chunk_size=chunk_size)

        def run() -> bytes:
            parts: List[bytes] = []
            sha = ""
            for chunk in self.registry.FetchModel(req, timeout=timeout_s or self.timeout_s,
                                                   metadata=self.metadata):
                parts.append(chunk.data)
                sha = chunk.sha256
            return _checked(b"".join(parts), sha, offset)

        return self._call("FetchModel", run)

    # ---- fleet ----
    def list_devices(self, group: str = "") -> List[kestrel_pb2.Device]:
        resp = self._call("ListDevices", lambda: self.fleet.ListDevices(
            kestrel_pb2.ListDevicesRequest(group=group), timeout=self.timeout_s, metadata=self.metadata))
        return list(resp.devices)

    def deploy(self, model_name: str, version: int = 0, device_id: str = "",
               group: str = "") -> kestrel_pb2.DeployResponse:
        req = kestrel_pb2.DeployRequest(model_name=model_name, version=version, device_id=device_id,
                                        group=group)
        return self._call("Deploy", lambda: self.fleet.Deploy(req, timeout=self.timeout_s, metadata=self.metadata))

    def rollback(self, device_id: str = "", group: str = "") -> kestrel_pb2.RollbackResponse:
        return self._call("Rollback", lambda: self.fleet.Rollback(kestrel_pb2.RollbackRequest(
            device_id=device_id, group=group), timeout=self.timeout_s, metadata=self.metadata))


def _checked(data: bytes, sha: str, offset: int) -> bytes:
    if offset == 0 and sha and hashlib.sha256(data).hexdigest() != sha:
        raise HubError("fetched bundle does not match the sha256 the hub announced; fetch again")
    return data
