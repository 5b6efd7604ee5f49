"""Push a bundle to the hub (gRPC ModelRegistry.PushModel, chunked) and optionally deploy it (Fleet.Deploy).

The trainer may not import ``hub`` (DESIGN.md), so this is its own small client; its error mapping is
the same as the hub CLI's (hub.fleetcmd.wrap_rpc_error):

* the hub answered and refused (INVALID_ARGUMENT: tampered / cut off / wrong hash, FAILED_PRECONDITION:
  untrusted key / not newer, ALREADY_EXISTS, NOT_FOUND, OUT_OF_RANGE) -> :class:`HubRefused`, an
  ArtifactError: retrying the same bundle will not help (``kestrel-train`` exits 2);
* unreachable, deadline exceeded, or a server-side failure -> edge.errors.HubError, a TransportError
  (exit 3): retrying later may help.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Optional

from edge.errors import ArtifactError, HubError

CHUNK_BYTES = 256 * 1024
TIMEOUT_S = 60.0                      # base deadline of a push ...
TIMEOUT_BYTES_PER_S = 1024 * 1024     # ... plus one second per MiB (a 200 MiB bundle gets 260 s)
CALL_TIMEOUT_S = 30.0
MAX_MESSAGE = 8 * 1024 * 1024

_REFUSALS = ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "ALREADY_EXISTS", "NOT_FOUND", "OUT_OF_RANGE")


class HubRefused(ArtifactError):
    """The hub answered and refused the request; ``code`` is the gRPC status name."""

    def __init__(self, code: str, detail: str, what: str = "") -> None:
        super().__init__(f"{what + ': ' if what else ''}hub refused ({code}): {detail}")
        self.code = code
        self.detail = detail


def push_timeout(size: int) -> float:
    """The deadline for pushing ``size`` bytes: a base plus a floor on the transfer rate."""
    return TIMEOUT_S + size / TIMEOUT_BYTES_PER_S


def chunks(data: bytes, size: int = CHUNK_BYTES) -> Iterator[Any]:
    from proto import kestrel_pb2

    digest = hashlib.sha256(data).hexdigest()
    if not data:
        yield kestrel_pb2.PushChunk(data=b"", total_size=0, sha256=digest)
        return
    for off in range(0, len(data), size):
        if off == 0:
            yield kestrel_pb2.PushChunk(data=data[:size], total_size=len(data), sha256=digest)
        else:
            yield kestrel_pb2.PushChunk(data=data[off:off + size])


def wrap_rpc_error(exc: Any, what: str, hub: str) -> Exception:
    """grpc.RpcError -> HubRefused (the hub said no) or HubError (could not get an answer)."""
    code = exc.code() if hasattr(exc, "code") else None
    name = getattr(code, "name", "UNKNOWN")
    detail = " ".join(str(exc.details() if hasattr(exc, "details") else exc).split())
    if name in _REFUSALS:
        return HubRefused(name, detail, f"{what} at hub {hub}")
    if name == "UNAVAILABLE":
        return HubError(f"{what}: hub at {hub} is unreachable or cannot serve it ({detail}); is "
                        "`kestrel-hub serve` running and --hub right?")
    if name == "DEADLINE_EXCEEDED":
        return HubError(f"{what}: hub at {hub} did not answer in time (deadline exceeded)")
    return HubError(f"{what} at hub {hub} failed ({name}): {detail}")


def _channel(hub: str) -> Any:
    import grpc

    return grpc.insecure_channel(hub, options=[("grpc.max_send_message_length", MAX_MESSAGE),
                                               ("grpc.max_receive_message_length", MAX_MESSAGE)])


def push(data: bytes, hub: str, timeout: Optional[float] = None) -> Any:
    """PushModel; returns the PushResult. HubRefused / HubError as above."""
    import grpc

    from proto import kestrel_pb2_grpc

    with _channel(hub) as ch:
        stub = kestrel_pb2_grpc.ModelRegistryStub(ch)
        try:
            return stub.PushModel(chunks(data), timeout=timeout or push_timeout(len(data)))
        except grpc.RpcError as exc:
            raise wrap_rpc_error(exc, "PushModel", hub) from exc


def latest_version(hub: str, model_name: str, timeout: float = CALL_TIMEOUT_S) -> int:
    import grpc

    from proto import kestrel_pb2, kestrel_pb2_grpc

    with _channel(hub) as ch:
        stub = kestrel_pb2_grpc.ModelRegistryStub(ch)
        try:
            resp = stub.ListModels(kestrel_pb2.ListModelsRequest(model_name=model_name), timeout=timeout)
        except grpc.RpcError as exc:
            raise wrap_rpc_error(exc, "ListModels", hub) from exc
    versions = [int(v.model.version) for v in resp.versions if v.model.name == model_name]
    return max(versions, default=0)


def deploy(hub: str, model_name: str, version: int, target: str, timeout: float = CALL_TIMEOUT_S) -> Any:
    """Fleet.Deploy to a group, or to a device when target is ``device:ID``."""
    import grpc

    from proto import kestrel_pb2, kestrel_pb2_grpc

    req = kestrel_pb2.DeployRequest(model_name=model_name, version=int(version))
    if target.startswith("device:"):
        req.device_id = target[len("device:"):]
    else:
        req.group = target
    with _channel(hub) as ch:
        stub = kestrel_pb2_grpc.FleetStub(ch)
        try:
            return stub.Deploy(req, timeout=timeout)
        except grpc.RpcError as exc:
            raise wrap_rpc_error(exc, "Deploy", hub) from exc


def describe(result: Optional[Any]) -> str:
    if result is None:
        return ""
    return f"{result.model.name} v{result.model.version} ({result.size} bytes, sha256 {result.bundle_sha256[:12]})"
