"""What ``kestrel-train push``/``push-model`` need beyond the hub's gRPC client: the hub's latest version of a
model, a deploy target, a one-line description of a push. The client itself (chunking, deadlines, the error
mapping: a refusal is exit 2, an unreachable hub exit 3) is proto.hubclient.HubClient, shared with kestrel-hub
(the trainer may not import hub, DESIGN.md).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

DEVICE_PREFIX = "device:"


def latest_version(client: Any, model_name: str) -> int:
    """The highest version of ``model_name`` in the hub's registry (0: none pushed yet)."""
    versions = [int(v.model.version) for v in client.list_models(model_name) if v.model.name == model_name]
    return max(versions, default=0)


def deploy_target(target: str) -> Dict[str, str]:
    """``--deploy`` as HubClient.deploy's keywords: a fleet group, or one device as ``device:ID``."""
    if target.startswith(DEVICE_PREFIX):
        return {"device_id": target[len(DEVICE_PREFIX):]}
    return {"group": target}


def deploy(client: Any, model_name: str, version: int, target: str) -> Any:
    """Deploy what was just pushed; a token that may push but not deploy (role trainer) gets a hint."""
    from proto.errors import HubRefused

    try:
        return client.deploy(model_name, version, **deploy_target(target))
    except HubRefused as exc:
        if exc.code != "PERMISSION_DENIED":
            raise
        raise HubRefused(exc.code, f"{exc.detail}; {model_name} v{version} is pushed: deploy it with a token of role "
                                   "operator (--deploy-token-file, make push-model DEPLOY_TOKEN_FILE=) or "
                                   "`kestrel-hub deploy`", "Deploy") from exc


def describe(result: Optional[Any]) -> str:
    if result is None:
        return ""
    return f"{result.model.name} v{result.model.version} ({result.size} bytes, sha256 {result.bundle_sha256[:12]})"
