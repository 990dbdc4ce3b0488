"""Crash-safe file writes and tolerant reads, for every small file the product writes (configs, metrics, error
records, pids, manifests).

A file is written under a temporary name in the same folder, flushed, and renamed into place: a reader sees
the old file or the new one, never a partial one, and a failed write (disk full) leaves the old file intact.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically; on any error the temporary file is removed and the error raised."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; on any error the temporary file is removed and the error raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj, **kw) -> None:
    """``json.dumps(obj)`` written atomically."""
    write_text_atomic(path, json.dumps(obj, **kw))


class DamagedFile(ValueError):
    """A file exists but cannot be parsed (empty, truncated, not JSON)."""


def read_json(path: str | Path, default=None):
    """The parsed JSON of ``path``; ``default`` if it does not exist; ``DamagedFile`` if it cannot be parsed."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return default
    except (OSError, UnicodeDecodeError) as e:
        raise DamagedFile(f"{path}: unreadable ({type(e).__name__})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise DamagedFile(f"{path}: not valid JSON ({len(text)} bytes)") from None
