"""What the store keeps for authentication (hub/auth.py, hub/web/principal.py): API tokens and browser sessions.

Neither record holds a secret: a token is kept as the sha256 of its text, a session as the sha256 of
its cookie value (the CSRF token of a session is not a credential on its own). Several hubs sharing
one store therefore share tokens and sessions, and a copy of the database lets nobody in.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TokenRecord:
    name: str              # who: recorded with every label they set
    role: str              # hub.auth.ROLES
    token_hash: str        # hex sha256 of the token text
    created_ms: int
    revoked_ms: int = 0    # 0 = active; a revoked name may be given to a new token

    @property
    def active(self) -> bool:
        return self.revoked_ms == 0


@dataclasses.dataclass
class SessionRecord:
    id_hash: str           # hex sha256 of the session cookie's value
    token_name: str        # the token the browser logged in with (its role and revocation apply at once)
    csrf: str              # the CSRF token every form post / JSON write of this session must carry
    created_ms: int
    expires_ms: int
