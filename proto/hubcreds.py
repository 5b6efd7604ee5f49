"""What a client of the hub's gRPC services shows it (a token) and how it knows the hub (the fleet CA that
signed the hub's TLS certificate): found the same way by ``kestrel-hub deploy|rollback|models|devices``,
``kestrel-train push|push-model`` (``make push-model``) and the demo (docs/security.md, "Tokens and roles").

The token file, first found of:

1. ``--token-file FILE`` (``make push-model TOKEN_FILE=``);
2. ``$KESTREL_HUB_TOKEN_FILE``;
3. ``~/.config/kestrel/hub-token`` (``$XDG_CONFIG_HOME/kestrel/hub-token``), when it exists;
4. the caller's fallbacks when they exist (``kestrel-hub`` commands: ``<data_dir>/admin-token`` of their
   ``--config``, the first admin token a new hub writes).

The CA file likewise: ``--ca-file``, ``$KESTREL_HUB_CA_FILE``, ``~/.config/kestrel/hub-ca.crt``, then the
fallbacks (``kestrel-hub``: ``<security dir>/ca-bundle.crt``); none found = the system's CAs (a hub with a
certificate of a public CA). A file named by a flag or the environment must exist. A token file must not
be readable by everyone (``chmod 600``): it is a secret. No token is ever logged or printed.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from proto.errors import ConfigError

TOKEN_ENV = "KESTREL_HUB_TOKEN_FILE"
CA_ENV = "KESTREL_HUB_CA_FILE"
TOKEN_NAME = "hub-token"
CA_NAME = "hub-ca.crt"
TOKEN_PREFIX = "kst_"  # hub.auth.TOKEN_PREFIX
TOKEN_HELP = (f"--token-file FILE, ${TOKEN_ENV} or ~/.config/kestrel/{TOKEN_NAME} (make one with `kestrel-hub "
              "tokens add NAME --role ROLE`)")
CA_HELP = (f"--ca-file FILE, ${CA_ENV} or ~/.config/kestrel/{CA_NAME}: the hub's <data_dir>/security/ca-bundle.crt "
           "(or a device's ca.crt)")


GRPC_VERBOSITY_ENV = "GRPC_VERBOSITY"


def quiet_grpc_core() -> None:
    """gRPC's C core prints its own INFO lines to stderr (a failed TLS handshake, before our one-line error
    says the same); keep them to errors unless $GRPC_VERBOSITY says otherwise. Call before grpc is imported."""
    os.environ.setdefault(GRPC_VERBOSITY_ENV, "ERROR")


def is_loopback(target: str) -> bool:
    """Whether ``host:port`` (or a bare host) names this machine: a token may travel in plain text only there."""
    host = target.rpartition(":")[0] if target.count(":") == 1 or target.startswith("[") else target
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/kestrel`` (``~/.config/kestrel``): where a user's token and CA are looked for."""
    base = os.environ.get("XDG_CONFIG_HOME", "") or str(Path("~").expanduser() / ".config")
    return Path(base) / "kestrel"


@dataclass
class Credentials:
    """What a HubClient connects with: the token (may be empty: the hub then answers UNAUTHENTICATED), the CA
    certificates (None = the system's), or a plain-text connection to the hub's loopback port."""
    token: str = field(default="", repr=False)  # a secret: never in a log line or repr
    token_file: str = ""
    ca_pem: Optional[bytes] = None
    ca_file: str = ""
    plaintext: bool = False


def _find(flag: str, env: str, default: Path, fallbacks: Sequence[Path], what: str) -> str:
    for given, source in ((flag, "--" + what), (os.environ.get(env, ""), "$" + env)):
        if given:
            path = Path(given).expanduser()
            if not path.is_file():
                raise ConfigError(f"{source} names {given}, which does not exist or is not a file")
            return str(path)
    for candidate in (default, *fallbacks):
        if candidate.is_file():
            return str(candidate)
    return ""


def read_token_file(path: str) -> str:
    """The token in a file (its first line, stripped); ConfigError saying what is wrong otherwise, also when
    everyone may read the file."""
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} does not hold a hub token (it is not text)") from exc
    if mode & stat.S_IROTH:
        raise ConfigError(f"token file {path} is readable by everyone (mode {stat.S_IMODE(mode):o}): run "
                          f"`chmod 600 {path}` (a token is a secret)")
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token.startswith(TOKEN_PREFIX):
        raise ConfigError(f"{path} does not hold a hub token (one line starting with {TOKEN_PREFIX!r}; make one "
                          "with `kestrel-hub tokens add NAME --role ROLE`)")
    return token


def find_token_file(flag: str = "", fallbacks: Sequence[Path] = ()) -> str:
    """The token file of the order in the module's doc ("" = none found)."""
    return _find(flag, TOKEN_ENV, config_dir() / TOKEN_NAME, fallbacks, "token-file")


def load(token_file: str = "", ca_file: str = "", plaintext: bool = False, *,
         token_fallbacks: Sequence[Path] = (), ca_fallbacks: Sequence[Path] = ()) -> Credentials:
    """The credentials a command connects with (the order in the module's doc)."""
    tfile = find_token_file(token_file, token_fallbacks)
    token = read_token_file(tfile) if tfile else ""
    if plaintext:
        return Credentials(token=token, token_file=tfile, plaintext=True)
    cfile = _find(ca_file, CA_ENV, config_dir() / CA_NAME, ca_fallbacks, "ca-file")
    ca_pem = None
    if cfile:
        try:
            ca_pem = Path(cfile).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the CA file {cfile}: {exc.strerror}") from exc
        if b"-----BEGIN CERTIFICATE-----" not in ca_pem:
            raise ConfigError(f"{cfile} holds no PEM certificate: name the hub's fleet CA ({CA_HELP})")
    return Credentials(token=token, token_file=tfile, ca_pem=ca_pem, ca_file=cfile)
