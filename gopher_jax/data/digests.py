"""Short content hashes: what names the data dir's artefacts and fingerprints them.

Their lengths are part of names already on disk (directory names, stored fingerprints), so
they are fixed: a JSON value's digest 12 hex digits, a file's as its caller says.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from gopher_jax import storage


def digest(obj: Any) -> str:
    """12 hex digits of the SHA-256 of a JSON-able value (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def file_sha(path: str | os.PathLike, chars: int = 16) -> str:
    """The first `chars` hex digits of a file's SHA-256, read in blocks (local or gs://)."""
    h = hashlib.sha256()
    with storage.data_path(path).open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:chars]
