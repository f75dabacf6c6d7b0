"""The API key, read from the environment variable the user names (never from a flag, which `ps` shows)."""

from __future__ import annotations

import os

from kiln.core.errors import UsageError

MIN_KEY_LENGTH = 16


def api_key_from_env(variable: str | None, flag: str = "--api-key-env", min_length: int = 0) -> str | None:
    """The key in `variable`, None when no variable is named; a UsageError when it is unset, empty or short."""
    if not variable:
        return None
    key = os.environ.get(variable, "")
    if not key:
        raise UsageError(f"{flag} names {variable!r}, which is unset or empty; export the key in that variable "
                         f"or drop {flag}")
    if len(key) < min_length:
        raise UsageError(f"the API key in {variable!r} is shorter than {min_length} characters; use a longer key")
    return key
