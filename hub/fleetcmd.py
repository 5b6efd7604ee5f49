"""Fleet and registry CLI (``kestrel-hub devices|deploy|rollback|models``) and the gRPC client behind it.

:class:`HubClient` is the gRPC client of the hub's services for the hub's CLIs (the trainer may not
import hub, so trainer/push.py has its own, with the same error mapping): insecure channel, a
deadline on every call, grpc.RpcError turned into ours: refusals
(INVALID_ARGUMENT, FAILED_PRECONDITION, ALREADY_EXISTS, NOT_FOUND) -> :class:`HubRefused`
(an ArtifactError: the request is wrong, retrying will not help); anything else -> edge.errors.HubError.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TypeVar

import grpc

from edge.errors import ArtifactError, HubError
from proto import kestrel_pb2, kestrel_pb2_grpc

T = TypeVar("T")

DEFAULT_HUB = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 30.0
PUSH_CHUNK = 256 * 1024
MAX_MESSAGE = 8 * 1024 * 1024

_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
             grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE}


class HubRefused(ArtifactError):
    """The hub answered and refused the request; ``code`` is the gRPC status name."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"hub refused ({code}): {detail}")
        self.code = code
        self.detail = detail


def wrap_rpc_error(exc: grpc.RpcError, what: str, target: str) -> Exception:
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    if code in _REFUSALS:
        return HubRefused(name, detail or "")
    if code == grpc.StatusCode.UNAVAILABLE:
        return HubError(f"{what}: hub at {target} is unreachable or cannot serve it ({detail}); is "
                        "`kestrel-hub serve` running and --hub right?")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return HubError(f"{what}: hub at {target} did not answer in time (deadline exceeded)")
    return HubError(f"{what}: hub at {target} failed ({name}): {detail}")


class HubClient:
    def __init__(self, target: str = DEFAULT_HUB, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.target = target
        self.timeout_s = timeout_s
        options = [("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.max_send_message_length", MAX_MESSAGE)]
        self.channel = grpc.insecure_channel(target, options=options)
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
        sha = hashlib.sha256(data).hexdigest()

        def chunks() -> Iterator[kestrel_pb2.PushChunk]:
            for i in range(0, max(len(data), 1), chunk_size):
                part = data[i:i + chunk_size]
                if i == 0:
                    yield kestrel_pb2.PushChunk(data=part, total_size=len(data), sha256=sha)
                else:
                    yield kestrel_pb2.PushChunk(data=part)

        deadline = timeout_s or self.timeout_s
        return self._call("push", lambda: self.registry.PushModel(chunks(), timeout=deadline))

    def list_models(self, model_name: str = "") -> List[kestrel_pb2.ModelVersion]:
        resp = self._call("list models", lambda: self.registry.ListModels(
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

        return self._call("fetch", run)

    # ---- fleet ----
    def list_devices(self, group: str = "") -> List[kestrel_pb2.Device]:
        resp = self._call("list devices", lambda: self.fleet.ListDevices(
            kestrel_pb2.ListDevicesRequest(group=group), timeout=self.timeout_s))
        return list(resp.devices)

    def deploy(self, model_name: str, version: int = 0, device_id: str = "",
               group: str = "") -> kestrel_pb2.DeployResponse:
        req = kestrel_pb2.DeployRequest(model_name=model_name, version=version, device_id=device_id,
                                        group=group)
        return self._call("deploy", lambda: self.fleet.Deploy(req, timeout=self.timeout_s))

    def rollback(self, device_id: str = "", group: str = "") -> kestrel_pb2.RollbackResponse:
        return self._call("rollback", lambda: self.fleet.Rollback(kestrel_pb2.RollbackRequest(
            device_id=device_id, group=group), timeout=self.timeout_s))


def _checked(data: bytes, sha: str, offset: int) -> bytes:
    if offset == 0 and sha and hashlib.sha256(data).hexdigest() != sha:
        raise HubError("fetched bundle does not match the sha256 the hub announced; fetch again")
    return data


# ---- CLI ----

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hub", default=DEFAULT_HUB, help=f"hub gRPC address HOST:PORT (default {DEFAULT_HUB})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="deadline per call in seconds")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _client(args: argparse.Namespace) -> HubClient:
    return HubClient(args.hub, args.timeout)


def _ms(ms: int) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _msg_dict(msg: Any) -> Dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def add_devices_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--group", default="", help="only devices of this group")


def run_devices(args: argparse.Namespace) -> int:
    with _client(args) as c:
        devs = c.list_devices(args.group)
    if args.json:
        print(json.dumps([_msg_dict(d) for d in devs], sort_keys=True))
        return 0
    rows = []
    for d in devs:
        desired = f"{d.desired_model} v{d.desired_version}" if d.desired_model or d.desired_version else "-"
        reported = f"{d.reported.name} v{d.reported.version}" if d.reported.name else "-"
        prev = f"v{d.versions.previous.version}" if d.versions.previous.version else "-"
        rows.append([d.device_id, d.group, d.state, _ms(d.last_seen_ms), desired, reported, prev,
                     d.versions.update_state or "-", d.versions.reason or ""])
    print_table(["DEVICE", "GROUP", "STATE", "LAST SEEN (UTC)", "DESIRED", "REPORTED", "PREVIOUS", "UPDATE",
                 "REASON"], rows)
    if not devs:
        print("(no devices have reported yet)")
    return 0


def _target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--device", default="", help="one device id")
    g.add_argument("--group", default="", help="a fleet group")


def add_deploy_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("model", help="model name")
    p.add_argument("version", nargs="?", type=int, default=0, help="version to run (default: the highest)")
    _target_args(p)


def _announce(args: argparse.Namespace, resp: Any, verb: str) -> int:
    if args.json:
        print(json.dumps(_msg_dict(resp), sort_keys=True))
        return 0
    d = resp.desired
    what = "rollback to the previous slot" if d.rollback else f"{d.model_name} v{d.version}"
    print(f"{verb}: {what} -> {resp.topic} (retained)")
    return 0


def run_deploy(args: argparse.Namespace) -> int:
    if args.version < 0:
        raise HubRefused("INVALID_ARGUMENT", "version must be >= 0")
    with _client(args) as c:
        resp = c.deploy(args.model, args.version, args.device, args.group)
    return _announce(args, resp, "deployed")


def add_rollback_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    _target_args(p)


def run_rollback(args: argparse.Namespace) -> int:
    with _client(args) as c:
        resp = c.rollback(args.device, args.group)
    return _announce(args, resp, "rollback announced")


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("model", nargs="?", default="", help="only this model name")


def run_models(args: argparse.Namespace) -> int:
    with _client(args) as c:
        versions = c.list_models(args.model)
    if args.json:
        out = []
        for v in versions:
            d = _msg_dict(v)
            d["metrics"] = json.loads(v.metrics_json or "{}")
            d.pop("metrics_json", None)
            out.append(d)
        print(json.dumps(out, sort_keys=True))
        return 0
    rows = []
    for v in versions:
        metrics = json.loads(v.metrics_json or "{}")
        shown = ", ".join(f"{k}={_num(val)}" for k, val in sorted(metrics.items())
                          if isinstance(val, (int, float)) and not isinstance(val, bool))
        rows.append([v.model.name, v.model.version, v.size, v.bundle_sha256[:12], v.key_id, _ms(v.created_ms),
                     shown])
    print_table(["MODEL", "VERSION", "BYTES", "SHA256", "KEY", "PUSHED (UTC)", "METRICS"], rows)
    if not versions:
        print("(no models pushed yet)")
    return 0


def _num(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
