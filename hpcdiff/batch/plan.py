"""A plan's digest: sha256 of its canonical JSON, so equal plans have equal digests on every host."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def digest(plan: Any) -> str:
    """sha256 of ``plan`` as canonical JSON (sorted keys, no spaces; other objects by ``str``)."""
    text = json.dumps(plan, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
