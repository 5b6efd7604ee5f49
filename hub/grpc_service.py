"""gRPC servicers for the ModelRegistry and Fleet services (proto/kestrel.proto).

Errors map to status codes with a one-line detail: refused pushes -> INVALID_ARGUMENT /
FAILED_PRECONDITION / ALREADY_EXISTS (hub.registry.PushRefused.kind), unknown versions/devices ->
NOT_FOUND, malformed requests -> INVALID_ARGUMENT, an unreachable store -> UNAVAILABLE.
``server_options`` sets message size limits so the configured chunks fit. Every call passes the token
check of hub/grpc_auth.py first (``make_server(..., auth=...)``); the port speaks TLS with a certificate of
the fleet CA (``tls=(key PEM, certificate PEM)``), and a plain-text port exists only on a loopback
address and only when asked for (``plain_port``, ``[grpc] plain_port``).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from typing import Any, Iterator, List, NoReturn, Optional, Sequence, Tuple

import grpc

from hub.errors import ConfigError, NotFound
from hub.fleet import FleetService, NothingToRollBack, device_message
from hub.grpc_auth import GrpcAuth
from hub.registry import EXISTS, INVALID, PRECONDITION, PushRefused, Registry, model_version_message
from proto import kestrel_pb2, kestrel_pb2_grpc
from proto.errors import ArtifactError, KestrelError, TransportError

log = logging.getLogger(__name__)

# Room for the protobuf framing around a chunk.
MESSAGE_OVERHEAD = 64 * 1024

_KIND_CODES = {
    INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    EXISTS: grpc.StatusCode.ALREADY_EXISTS,
}


def server_options(chunk_size: int) -> List[Tuple[str, int]]:
    """grpc.server options: messages big enough for one chunk (pushes may use up to 4 MiB chunks)."""
    limit = max(chunk_size, 4 * 1024 * 1024) + MESSAGE_OVERHEAD
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


def status_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, (PushRefused, NothingToRollBack)):
        return _KIND_CODES.get(exc.kind, grpc.StatusCode.INVALID_ARGUMENT)
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, ArtifactError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, TransportError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    detail = " ".join(str(exc).split()) or type(exc).__name__
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error: %s", detail, exc_info=exc)
    context.abort(code, detail)
    raise AssertionError("unreachable")  # pragma: no cover - abort raises


class RegistryServicer(kestrel_pb2_grpc.ModelRegistryServicer):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def PushModel(self, request_iterator: Iterator[kestrel_pb2.PushChunk],  # noqa: N802
                  context: grpc.ServicerContext) -> kestrel_pb2.PushResult:
        timeout = self.registry.cfg.push_timeout_s
        deadline = time.monotonic() + timeout
        # A client that stalls mid-stream is cut off: cancelling makes the request iterator raise.
        timer = threading.Timer(timeout, context.cancel)
        timer.daemon = True
        timer.start()
        try:
            rec = self.registry.push(request_iterator, deadline=deadline)
        except KestrelError as exc:
            _abort(context, exc)
        except grpc.RpcError:  # cancelled (client or push_timeout_s): the temp file is gone already
            log.info("push cancelled after %s; nothing stored",
                     "push_timeout_s" if time.monotonic() >= deadline else "the client left")
            raise
        finally:
            timer.cancel()
        return kestrel_pb2.PushResult(
            model=kestrel_pb2.ModelRef(name=rec.model_name, version=rec.version, sha256=rec.model_sha256),
            bundle_sha256=rec.bundle_sha256, size=rec.size)

    def ListModels(self, request: kestrel_pb2.ListModelsRequest,  # noqa: N802
                   context: grpc.ServicerContext) -> kestrel_pb2.ListModelsResponse:
        try:
            recs = self.registry.list_models(request.model_name or None)
        except KestrelError as exc:
            _abort(context, exc)
        return kestrel_pb2.ListModelsResponse(versions=[model_version_message(r) for r in recs])

    def FetchModel(self, request: kestrel_pb2.FetchRequest,  # noqa: N802
                   context: grpc.ServicerContext) -> Iterator[kestrel_pb2.FetchChunk]:
        try:
            chunks = self.registry.fetch(request.model_name, int(request.version), int(request.offset),
                                         int(request.chunk_size))
            for chunk in chunks:
                if not context.is_active():
                    return
                yield chunk
        except KestrelError as exc:
            _abort(context, exc)


class FleetServicer(kestrel_pb2_grpc.FleetServicer):
    def __init__(self, fleet: FleetService) -> None:
        self.fleet = fleet

    def ListDevices(self, request: kestrel_pb2.ListDevicesRequest,  # noqa: N802
                    context: grpc.ServicerContext) -> kestrel_pb2.ListDevicesResponse:
        try:
            devs = self.fleet.list_devices(request.group or None)
        except KestrelError as exc:
            _abort(context, exc)
        return kestrel_pb2.ListDevicesResponse(devices=[device_message(d) for d in devs])

    def Deploy(self, request: kestrel_pb2.DeployRequest,  # noqa: N802
               context: grpc.ServicerContext) -> kestrel_pb2.DeployResponse:
        try:
            ann = self.fleet.deploy(request.model_name, int(request.version), request.device_id,
                                    request.group)
        except KestrelError as exc:
            _abort(context, exc)
        return kestrel_pb2.DeployResponse(desired=ann.desired, topic=ann.topic)

    def Rollback(self, request: kestrel_pb2.RollbackRequest,  # noqa: N802
                 context: grpc.ServicerContext) -> kestrel_pb2.RollbackResponse:
        try:
            ann = self.fleet.rollback(request.device_id, request.group)
        except KestrelError as exc:
            _abort(context, exc)
        return kestrel_pb2.RollbackResponse(desired=ann.desired, topic=ann.topic)


def add_services(server: grpc.Server, registry: Registry, fleet: Optional[FleetService]) -> None:
    """Register the ModelRegistry (and, when given, the Fleet) servicers on ``server``."""
    kestrel_pb2_grpc.add_ModelRegistryServicer_to_server(RegistryServicer(registry), server)
    if fleet is not None:
        kestrel_pb2_grpc.add_FleetServicer_to_server(FleetServicer(fleet), server)


LOOPBACK = "127.0.0.1"


def make_server(registry: Registry, fleet: Optional[FleetService], bind: str = LOOPBACK, port: int = 0,
                max_workers: int = 8, *, auth: GrpcAuth, tls: Optional[Tuple[bytes, bytes]],
                plain_port: Optional[int] = None) -> Tuple[grpc.Server, int, int]:
    """A start-ready (not yet started) server with both services behind ``auth``; returns (server, bound
    port, bound plain port or 0). ``tls``: (private key PEM, certificate chain PEM) for ``bind:port``;
    None = that port speaks plain text, allowed only on a loopback address (tests of the services).
    ``plain_port`` (0 = a free one): a plain-text port more, always on 127.0.0.1."""
    if tls is None and not _loopback(bind):
        raise ConfigError(f"a plain-text gRPC port on {bind} would carry tokens in the clear: only on a loopback "
                          "address")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=[auth],
                         options=server_options(registry.cfg.chunk_size))
    add_services(server, registry, fleet)
    bound = bind_grpc(server, bind, port, tls)
    plain = bind_grpc(server, LOOPBACK, plain_port, None, what="[grpc] plain_port") if plain_port is not None else 0
    return server, bound, plain


def _loopback(bind: str) -> bool:
    return bind in ("127.0.0.1", "localhost", "::1") or bind.startswith("127.")


def server_credentials(tls: Tuple[bytes, bytes]) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([tls])


def bind_grpc(server: grpc.Server, bind: str, port: int, tls: Optional[Tuple[bytes, bytes]] = None,
              what: str = "[grpc] port") -> int:
    """add_secure_port (``tls``) or add_insecure_port with our error: grpcio raises RuntimeError (older
    versions return 0) when the address is taken or cannot be bound."""
    address = f"{bind}:{port}"
    hint = f"is another hub running, or is the port taken? Set {what} (0 = any free port)"
    try:
        bound = int(server.add_secure_port(address, server_credentials(tls)) if tls is not None
                    else server.add_insecure_port(address))
    except RuntimeError as exc:
        raise TransportError(f"cannot listen for gRPC on {address} ({exc}): {hint}") from exc
    if not bound:
        raise TransportError(f"cannot listen for gRPC on {address}: {hint}")
    return bound


__all__: Sequence[Any] = ["add_services", "bind_grpc", "make_server", "server_options", "status_for",
                          "RegistryServicer", "FleetServicer"]
