"""Files the edge's config names for its credentials: certificates, keys, passwords, fleet keys.

A relative name is looked up in ``$CREDENTIALS_DIRECTORY`` first (set by systemd for the unit's
``LoadCredential=`` / ``SetCredential=``), then taken as given: the Jetson image names a device's
secrets by their bare member name on systemd >= 247 (docs/jetson.md) and by their path under
/etc/kestrel/credentials on older ones. A secret (a private key, a password) is refused when
everyone may read it (docs/security.md, "Secrets on the device").
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Optional

from proto.errors import ConfigError

CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"  # set by systemd for LoadCredential= / SetCredential=


def credential_path(path: str) -> str:
    """A credential file named in the config: a relative name is looked up in $CREDENTIALS_DIRECTORY
    first (systemd LoadCredential=), then as given. "" stays ""."""
    if not path:
        return path
    creds = os.environ.get(CREDENTIALS_ENV, "")
    if creds and not os.path.isabs(path):
        candidate = Path(creds) / path
        if candidate.exists():
            return str(candidate)
    return path


def secret_file(path: str) -> str:
    """credential_path(path), refused (ConfigError) when everyone may read it: a secret is 0600 or 0640."""
    resolved = credential_path(path)
    try:
        mode = os.stat(resolved).st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {resolved}: {exc.strerror}") from exc
    if mode & stat.S_IROTH:
        raise ConfigError(f"secret file {resolved} is readable by everyone (mode {stat.S_IMODE(mode):o}): "
                          f"run `chmod o-rwx {resolved}`")
    return resolved


def read_secret(path: str) -> Optional[str]:
    """The content of a secret file (stripped) or None when no file is named; see secret_file."""
    if not path:
        return None
    resolved = secret_file(path)
    try:
        return Path(resolved).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {resolved}: {exc.strerror}") from exc
