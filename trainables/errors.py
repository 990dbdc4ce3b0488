"""One error type for bad input from the user.

Everything a user can get wrong (a config key, a space file, a sweep name, an SQL query, a checkpoint path)
raises a ``UserError`` (or a subclass naming the area). The CLI prints its message as one line and exits with
code 2; nothing else is treated as a user error. Messages start with what was wrong (the dotted key, the flag,
the file) and quote at most a short excerpt of what the user gave (``excerpt``).
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: reported as one line, exit code 2, before any expensive work starts."""


def excerpt(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, so an error never echoes a whole file back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
