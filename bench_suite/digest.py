"""Short content digests: of JSON-able settings (cache keys, folder names) and of a set of selected ids."""

from __future__ import annotations

import hashlib
import json

import numpy as np


def json_digest(obj, length: int = 20) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys; anything else as ``str``), first ``length`` hex digits."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def ids_digest(ids) -> str:
    """sha256 of the sorted ids (int64): the same set of samples gives the same digest, whatever the order."""
    return hashlib.sha256(np.sort(np.asarray(ids, dtype=np.int64)).tobytes()).hexdigest()[:16]
