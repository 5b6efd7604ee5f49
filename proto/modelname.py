"""The rule for model names (bundle manifests, desired-state messages, [update] model_name), in a
module of its own so edge.config can apply it without importing proto.bundle (and cryptography)."""

from __future__ import annotations

import re
from typing import Any

MODEL_NAME_RULE = "1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or a digit"
# fullmatch with \Z semantics: "$" would also match before a trailing newline ("name\n").
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def valid_model_name(name: Any) -> bool:
    """True for a model name a manifest may carry (also used for desired-state messages)."""
    return isinstance(name, str) and _MODEL_NAME_RE.fullmatch(name) is not None
