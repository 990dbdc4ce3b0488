"""The field helper of the typed config's dataclasses (``config.py`` and every objective's settings section):
a default with the metadata the loader checks (allowed choices, an inclusive numeric range) and a one-line doc.
Here, not in ``config.py``, so that an objective's module declares its section without importing the config."""

from __future__ import annotations

from dataclasses import field


def setting(default, *, choices=None, lo=None, hi=None, doc=""):
    """A dataclass field with validation metadata (allowed choices, inclusive numeric range)."""
    meta = {"choices": choices, "lo": lo, "hi": hi, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)
