"""The gRPC client of the hub's services (ModelRegistry, Fleet), shared by ``kestrel-hub``'s fleet commands
(hub.cli.fleet), ``kestrel-train push``/``push-model`` (trainer/push.py, which may not import hub) and the demo.
It lives in edge/ because every side already imports edge: Python 3.8, no TensorFlow.

Insecure channel, a deadline on every call (a push's grows with its size), and grpc.RpcError turned into ours:

* the hub answered and refused (INVALID_ARGUMENT: tampered / cut off / wrong hash, FAILED_PRECONDITION:
  untrusted key / not newer, ALREADY_EXISTS, NOT_FOUND, OUT_OF_RANGE) -> :class:`HubRefused`, an
  ArtifactError: retrying the same request will not help (the CLIs exit 2);
* unreachable, deadline exceeded, or a server-side failure -> proto.errors.HubError, a TransportError
  (exit 3): retrying later may help.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterator, List, Optional, TypeVar

import grpc

from proto import kestrel_pb2, kestrel_pb2_grpc
from proto.errors import HubError, HubRefused

T = TypeVar("T")

DEFAULT_HUB = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 30.0              # deadline of every call but a push ...
PUSH_TIMEOUT_S = 60.0                 # ... a push gets this base ...
PUSH_BYTES_PER_S = 1024 * 1024        # ... plus one second per MiB (a 200 MiB bundle gets 260 s)
PUSH_CHUNK = 256 * 1024
MAX_MESSAGE = 8 * 1024 * 1024

REFUSALS = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION", "ALREADY_EXISTS", "NOT_FOUND", "OUT_OF_RANGE"})



def wrap_rpc_error(exc: Any, what: str, hub: str) -> Exception:
    """grpc.RpcError -> HubRefused (the hub said no) or HubError (could not get an answer)."""
    code = exc.code() if hasattr(exc, "code") else None
    name = getattr(code, "name", "UNKNOWN")
    detail = " ".join(str(exc.details() if hasattr(exc, "details") else exc).split())
    if name in REFUSALS:
        return HubRefused(name, detail, f"{what} at hub {hub}")
    if name == "UNAVAILABLE":
        return HubError(f"{what}: hub at {hub} is unreachable or cannot serve it ({detail}); is "
                        "`kestrel-hub serve` running and --hub right?")
    if name == "DEADLINE_EXCEEDED":
        return HubError(f"{what}: hub at {hub} did not answer in time (deadline exceeded)")
    return HubError(f"{what} at hub {hub} failed ({name}): {detail}")


def channel(hub: str) -> grpc.Channel:
    return grpc.insecure_channel(hub, options=[("grpc.max_send_message_length", MAX_MESSAGE),
                                               ("grpc.max_receive_message_length", MAX_MESSAGE)])


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
    def __init__(self, target: str = DEFAULT_HUB, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.channel = channel(target)
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
            raise wrap_rpc_error(exc, what, self.target) from exc

    # ---- registry ----
    def push(self, data: bytes, chunk_size: int = PUSH_CHUNK,
             timeout_s: Optional[float] = None) -> kestrel_pb2.PushResult:
        """PushModel; the deadline is push_timeout(len(data)) unless given."""
        deadline = timeout_s or push_timeout(len(data))
        return self._call("PushModel", lambda: self.registry.PushModel(push_chunks(data, chunk_size), timeout=deadline))

    def list_models(self, model_name: str = "") -> List[kestrel_pb2.ModelVersion]:
        resp = self._call("ListModels", lambda: self.registry.ListModels(
            kestrel_pb2.ListModelsRequest(model_name=model_name), timeout=self.timeout_s))
        return list(resp.versions)

    def fetch(self, model_name: str, version: int = 0, offset: int = 0, chunk_size: int = 0,
              timeout_s: Optional[float] = None) -> bytes:
        """The bundle bytes from ``offset``; checks the whole-bundle sha256 when starting at 0."""
        req = kestrel_pb2.FetchRequest(model_name=model_name, version=version, offset=offset,
                                       chunk_size=chunk_size)

        def run() -> bytes:
            parts: List[bytes] = []
            sha = ""
            for chunk in self.registry.FetchModel(req, timeout=timeout_s or self.timeout_s):
                parts.append(chunk.data)
                sha = chunk.sha256
            return _checked(b"".join(parts), sha, offset)

        return self._call("FetchModel", run)

    # ---- fleet ----
    def list_devices(self, group: str = "") -> List[kestrel_pb2.Device]:
        resp = self._call("ListDevices", lambda: self.fleet.ListDevices(
            kestrel_pb2.ListDevicesRequest(group=group), timeout=self.timeout_s))
        return list(resp.devices)

    def deploy(self, model_name: str, version: int = 0, device_id: str = "",
               group: str = "") -> kestrel_pb2.DeployResponse:
        req = kestrel_pb2.DeployRequest(model_name=model_name, version=version, device_id=device_id,
                                        group=group)
        return self._call("Deploy", lambda: self.fleet.Deploy(req, timeout=self.timeout_s))

    def rollback(self, device_id: str = "", group: str = "") -> kestrel_pb2.RollbackResponse:
        return self._call("Rollback", lambda: self.fleet.Rollback(kestrel_pb2.RollbackRequest(
            device_id=device_id, group=group), timeout=self.timeout_s))


def _checked(data: bytes, sha: str, offset: int) -> bytes:
    if offset == 0 and sha and hashlib.sha256(data).hexdigest() != sha:
        raise HubError("fetched bundle does not match the sha256 the hub announced; fetch again")
    return data
