"""Who may call which gRPC method: ``authorization: Bearer <token>`` metadata, checked per method against
the token's role (hub/auth.py, the same tokens as the dashboard; docs/security.md, ADR 0020).

* no token, a malformed header, or a token the store does not know (or that was revoked) ->
  UNAUTHENTICATED;
* a token whose role lacks the method's permission -> PERMISSION_DENIED;
* the store cannot be asked -> UNAVAILABLE (the client retries later);

in every case before the servicer runs, so a refused push, deploy or rollback changes nothing. A method
not in :data:`METHOD_PERMISSIONS` needs ``admin`` (deny by default).

The check runs on the worker thread of the call, not in ``intercept_service``: grpc runs interceptors on
its one serving thread under the server's lock, where a store lookup would hold up every other call. So
the interceptor returns the method's own handler with its behaviour wrapped (public grpc API: the
``*_rpc_method_handler`` factories and the handler's documented attributes). Refusals are logged (the
token's name, never the token) and counted for /metrics.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import grpc

from hub.auth import ADMIN, DEPLOY, FETCH, MODELS, PUSH, READ, Principal
from proto.errors import KestrelError

log = logging.getLogger("hub.grpc")

_REGISTRY = "/kestrel.v1.ModelRegistry/"
_FLEET = "/kestrel.v1.Fleet/"
METHOD_PERMISSIONS: Dict[str, str] = {
    _REGISTRY + "PushModel": PUSH,
    _REGISTRY + "ListModels": MODELS,
    _REGISTRY + "FetchModel": FETCH,
    _FLEET + "ListDevices": READ,
    _FLEET + "Deploy": DEPLOY,
    _FLEET + "Rollback": DEPLOY,
}
BEARER = "bearer"

Authenticate = Callable[[str], Optional[Principal]]


@dataclass(frozen=True)
class Refusal:
    """Why a call is refused: its status code, the counter's reason, the one-line detail."""
    code: grpc.StatusCode
    reason: str
    detail: str


def bearer_token(metadata: Any) -> Tuple[str, str]:
    """(token, problem) from call metadata: problem is "" when a Bearer token is there."""
    values = [v for k, v in (metadata or ()) if k == "authorization"]
    if not values:
        return "", "no token"
    if len(values) > 1:
        return "", "more than one authorization header"
    scheme, _, token = str(values[0]).partition(" ")
    if scheme.lower() != BEARER or not token.strip():
        return "", "the authorization header must be: Bearer <token>"
    return token.strip(), ""


class GrpcAuth(grpc.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type hints
    """The server interceptor; ``authenticate(token)`` is hub.auth.authenticate bound to the store."""

    def __init__(self, authenticate: Authenticate) -> None:
        self.authenticate = authenticate
        self._lock = threading.Lock()
        self.refused: Dict[str, int] = {}  # reason -> count (unauthenticated, permission_denied, unavailable)

    def check(self, method: str, metadata: Any) -> Union[Principal, Refusal]:
        """The principal that may call ``method``, or why not."""
        need = METHOD_PERMISSIONS.get(method, ADMIN)
        token, problem = bearer_token(metadata)
        if problem:
            return Refusal(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated",
                           f"{problem}: send `authorization: Bearer <token>` (a token of `kestrel-hub tokens add`)")
        try:
            who = self.authenticate(token)
        except KestrelError as exc:  # the store is away
            return Refusal(grpc.StatusCode.UNAVAILABLE, "unavailable",
                           f"cannot check the token now ({' '.join(str(exc).split())}); retry later")
        if who is None:
            return Refusal(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated",
                           "the token is not valid (unknown or revoked)")
        if not who.can(need):
            return Refusal(grpc.StatusCode.PERMISSION_DENIED, "permission_denied",
                           f"token {who.name!r} (role {who.role}) may not {need} ({method.rsplit('/', 1)[-1]}); "
                           "ask an admin for a token with that role")
        return who

    def _guard(self, method: str, context: grpc.ServicerContext) -> None:
        who = self.check(method, context.invocation_metadata())
        if isinstance(who, Refusal):
            with self._lock:
                self.refused[who.reason] = self.refused.get(who.reason, 0) + 1
            log.warning("gRPC %s from %s refused (%s): %s", method.rsplit("/", 1)[-1], context.peer(),
                        who.code.name, who.detail)
            context.abort(who.code, who.detail)
            raise AssertionError("unreachable")  # pragma: no cover - abort raises
        if METHOD_PERMISSIONS.get(method) in (PUSH, DEPLOY):
            log.info("gRPC %s called by token %r (role %s)", method.rsplit("/", 1)[-1], who.name, who.role)

    def counts(self) -> Dict[str, int]:
        with self._lock:
            return dict(self.refused)

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = str(details.method)
        if handler.request_streaming and handler.response_streaming:
            kind = "stream_stream"
        elif handler.request_streaming:
            kind = "stream_unary"
        elif handler.response_streaming:
            kind = "unary_stream"
        else:
            kind = "unary_unary"
        behaviour = getattr(handler, kind)

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            self._guard(method, context)  # before the servicer: a refused call changes nothing
            return behaviour(request, context)

        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(guarded, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
