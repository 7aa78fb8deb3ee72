"""Ordering of resourceVersions, for reading one's own writes from a watch-fed cache.

Kubernetes defines resourceVersions of objects of one type as comparable (KEP-5504, stable
in 1.35; etcd's revisions always were): decimal integers without leading zeros, a longer
one is newer, equal lengths compare as strings. Anything else (an API server with another
storage) compares as unknown, and unknown never counts as caught up: the caller then reads
from the API, which is always correct, only slower.
"""

from __future__ import annotations

from typing import Final

# A floor no version meets: what a write that failed (and may have landed) leaves behind.
UNSEEN: Final = "unseen"


def comparable(version: str | None) -> bool:
    if not version:
        return False
    return version.isdecimal() and version.isascii() and version[0] != "0"


def at_least(version: str | None, floor: str | None) -> bool:
    """Whether `version` is `floor` or newer; no floor is always met."""
    if not floor:
        return True
    if version is None or not comparable(version) or not comparable(floor):
        return False
    return (len(version), version) >= (len(floor), floor)


def newest(a: str | None, b: str | None) -> str | None:
    """The newer of two versions (either when one is missing); an incomparable one wins, so
    a floor nobody can meet sends reads to the API rather than to a cache that may lag."""
    if not a or not b:
        return a or b
    if not comparable(a):
        return a
    if not comparable(b):
        return b
    return a if at_least(a, b) else b
