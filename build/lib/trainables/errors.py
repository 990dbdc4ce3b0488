"""One error type for bad input from the user.

Everything a user can get wrong (a config key, a space file, a sweep name, an SQL query, a checkpoint path)
raises a ``UserError`` (or a subclass naming the area). The CLI prints its message as one line and exits with
code 2; nothing else is treated as a user error. Messages start with what was wrong (the dotted key, the flag,
the file) and quote at most a short excerpt of what the user gave (``excerpt``).
"""

from __future__ import annotations

import reprlib


class UserError(ValueError):
    """Bad input from the user: reported as one line, exit code 2, before any expensive work starts."""


class ConfigError(UserError):
    """A config value is unknown, of the wrong type, out of range, or inconsistent with another one."""


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxset = 3, 8, 8, 8, 8
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 200, 200, 200


def excerpt(value, limit: int = 80) -> str:
    """A short ``repr`` of ``value``, cut to ``limit`` characters, so an error never echoes a whole file back. A
    container's repr is built only as deep and as wide as is shown (a YAML alias bomb is a small graph whose full
    repr would be gigabytes)."""
    if isinstance(value, (str, bytes)) and len(value) > 4 * limit:
        value = value[:4 * limit]
        text = repr(value)
        return f"{text[:limit]}..."
    if isinstance(value, (str, bytes, int, float, bool, type(None))):
        text = repr(value)
        return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
    text = _SHORT.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""
