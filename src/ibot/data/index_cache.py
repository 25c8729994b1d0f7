"""On-disk caches of dataset indexes (file lists, shard offsets), checked against a fingerprint.

A cache file holds ``{"fingerprint": ..., "payload": ...}``; it is used only while the data's
fingerprint (modification times, sizes) is unchanged. A cache that cannot be read or written
only costs a re-scan, never a failed run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def cache_path(cache_dir: str | Path, kind: str, key: str) -> Path:
    """``cache_dir/kind-<hash of key>.json``."""
    return Path(cache_dir).expanduser() / f"{kind}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def read_entry(path: Path) -> tuple[Any, Any] | None:
    """(fingerprint, payload) as written, or None when missing or unreadable (garbage, truncated).

    For a fingerprint that can only be checked once read (the folders an index walked).
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError: binary garbage too
        return None
    if not isinstance(data, dict) or "fingerprint" not in data:
        return None
    return data["fingerprint"], data.get("payload")


def read_cache(path: Path, fingerprint: Any) -> Any | None:
    """The cached payload, or None when missing, unreadable or stale."""
    entry = read_entry(path)
    if entry is None or entry[0] != fingerprint:
        return None
    return entry[1]


def write_cache(path: Path, fingerprint: Any, payload: Any) -> None:
    """Atomically write the payload (rename over the old file)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "payload": payload}))
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not write the index cache %s: %s", path, exc)
