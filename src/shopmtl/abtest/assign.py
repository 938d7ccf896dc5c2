"""Assignment of users to arms by a salted hash: stable for a user within an experiment and
independent across experiments (each experiment has its own salt).

The user id never leaves this module in the clear: the event store keeps ``unit_of(user, salt)``,
a keyed hash, so an exposure log cannot be joined back to raw ids without the salt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

_SCALE = float(2**64)


def _h(salt: str, user: str, purpose: str) -> int:
    digest = hashlib.sha256(f"{purpose}\0{salt}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def unit_of(user: str, salt: str) -> str:
    """The experiment unit as stored: 16 hex digits of a salted SHA-256 of the user id."""
    return f"{_h(salt, str(user), 'unit'):016x}"


def bucket(user: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by (salt, user)."""
    return _h(salt, str(user), "bucket") / _SCALE


def check_arms(arms: Sequence[tuple[str, float]]) -> None:
    names = [a for a, _ in arms]
    if len(arms) < 2:
        raise ValueError("an experiment needs at least two arms")
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique, got {names}")
    if any(not (0 < s <= 1) for _, s in arms):
        raise ValueError("every arm's share must lie in (0, 1]")
    if abs(sum(s for _, s in arms) - 1.0) > 1e-9:
        raise ValueError(f"arm shares must sum to 1, got {sum(s for _, s in arms):.6g}")


def assign(user: str, salt: str, arms: Sequence[tuple[str, float]]) -> str:
    """The arm of ``user``: the arm whose cumulative share interval holds ``bucket(user, salt)``."""
    b = bucket(user, salt)
    acc = 0.0
    for name, share in arms:
        acc += share
        if b < acc:
            return name
    return arms[-1][0]  # b is within rounding of 1
