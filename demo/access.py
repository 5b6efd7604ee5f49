"""The hub tokens the demo's people and machines use, and the CA they verify the hub's gRPC with.

As an operator would set them up: ``kestrel-hub tokens add NAME --role ROLE`` prints a token once; it goes
into a file only its owner may read (0600), named by ``--token-file`` (docs/security.md, "Tokens and
roles"). The trainer's token (role ``trainer``) may push and nothing else, the operator's deploy and roll
back; the device gets its own (role ``device``, fetch only) in its identity bundle. Every gRPC client
verifies the hub's certificate with the fleet CA (``hub.json``'s ``grpc_ca_file``, the hub's
``security/ca-bundle.crt``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List

ROLES = ("trainer", "operator", "device")


class HubAccess:
    """Token files per role under ``work/tokens`` (made at first use), and the CA of a running hub.
    ``run_tool(argv, log)`` runs a command to completion (demo.loop.run_tool)."""

    def __init__(self, work: Path, hub_config: Path, log: Path, run_tool: Callable[..., Any]) -> None:
        self.dir = work / "tokens"
        self.hub_config = hub_config
        self.log = log
        self.run_tool = run_tool
        self.ca_file = ""
        self._files: Dict[str, Path] = {}

    def hub_started(self, hub_info: Dict[str, Any]) -> None:
        self.ca_file = str(hub_info.get("grpc_ca_file") or "")
        self._files = {r: p for r, p in self._files.items() if p.exists()}

    def token_file(self, role: str) -> Path:
        """``kestrel-hub tokens add demo-ROLE --role ROLE``, the token kept in ``tokens/ROLE.token`` (0600)."""
        if role not in self._files:
            self.dir.mkdir(mode=0o700, exist_ok=True)
            r = self.run_tool([sys.executable, "-m", "hub", "tokens", "--config", str(self.hub_config), "add",
                               f"demo-{role}", "--role", role, "--json"], self.log, secret=True)
            token = json.loads(r.stdout.decode().strip().splitlines()[-1])["token"]
            path = self.dir / f"{role}.token"
            path.touch(mode=0o600)
            path.chmod(0o600)
            path.write_text(token + "\n")
            self._files[role] = path
        return self._files[role]

    def args(self, role: str) -> List[str]:
        """The flags of a kestrel-hub / kestrel-train command acting as ``role``."""
        return ["--token-file", str(self.token_file(role)), "--ca-file", self.ca_file]

    def credentials(self, role: str) -> Any:
        from proto import hubcreds

        return hubcreds.load(str(self.token_file(role)), self.ca_file)
