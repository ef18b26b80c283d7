"""The one seed derivation of the project: every random stream is a function of the run seed and counters."""

from __future__ import annotations

import hashlib


def seed_for(seed: int, *counters: int) -> int:
    """A 63-bit seed from the run seed and counters (step, rank, micro-batch): independent streams per step."""
    key = "/".join(str(c) for c in (seed, *counters)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)
