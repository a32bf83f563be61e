"""The one seeded RNG: a ``random.Random`` keyed by a tuple of values through sha256.

Why sha256 and not ``hash()``: Python salts str hashes per process, which would break determinism across
workers, resumes and machines. ``seeded_rng(a, b, c)`` seeds from ``sha256("a|b|c")``'s first 8 bytes
(little-endian), so e.g. ``seeded_rng("replay", seed, epoch, uid)`` is the same generator everywhere.
"""

from __future__ import annotations

import hashlib
import random

__all__ = ["seeded_rng", "seed_of"]


def seed_of(*parts: object) -> int:
    """The 64-bit seed of ``parts`` (joined with ``|`` as text)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def seeded_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded by :func:`seed_of` of ``parts``."""
    return random.Random(seed_of(*parts))
