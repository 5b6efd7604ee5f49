"""Push a bundle to the hub (gRPC ModelRegistry.PushModel, chunked) and optionally deploy it (Fleet.Deploy)."""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Optional

from edge.errors import HubError

CHUNK_BYTES = 256 * 1024
TIMEOUT_S = 60.0


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


def _wrap(exc: Any, what: str, hub: str) -> HubError:
    code = exc.code().name if hasattr(exc, "code") and exc.code() is not None else "ERROR"
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    return HubError(f"{what} at hub {hub} failed: {code}: {(detail or '').splitlines()[0] if detail else ''}")


def _channel(hub: str) -> Any:
    import grpc

    return grpc.insecure_channel(hub, options=[("grpc.max_send_message_length", 8 * 1024 * 1024)])


def push(data: bytes, hub: str, timeout: float = TIMEOUT_S) -> Any:
    """PushModel; returns the PushResult. HubError on any gRPC error."""
    import grpc

    from proto import kestrel_pb2_grpc

    with _channel(hub) as ch:
        stub = kestrel_pb2_grpc.ModelRegistryStub(ch)
        try:
            return stub.PushModel(chunks(data), timeout=timeout)
        except grpc.RpcError as exc:
            raise _wrap(exc, "PushModel", hub) from exc


def latest_version(hub: str, model_name: str, timeout: float = 10.0) -> int:
    import grpc

    from proto import kestrel_pb2, kestrel_pb2_grpc

    with _channel(hub) as ch:
        stub = kestrel_pb2_grpc.ModelRegistryStub(ch)
        try:
            resp = stub.ListModels(kestrel_pb2.ListModelsRequest(model_name=model_name), timeout=timeout)
        except grpc.RpcError as exc:
            raise _wrap(exc, "ListModels", hub) from exc
    versions = [int(v.model.version) for v in resp.versions if v.model.name == model_name]
    return max(versions, default=0)


def deploy(hub: str, model_name: str, version: int, target: str, timeout: float = 30.0) -> Any:
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
            raise _wrap(exc, "Deploy", hub) from exc


def describe(result: Optional[Any]) -> str:
    if result is None:
        return ""
    return f"{result.model.name} v{result.model.version} ({result.size} bytes, sha256 {result.bundle_sha256[:12]})"
