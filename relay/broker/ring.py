"""Consistent hashing of channel names over Redis shards.

Each shard owns ``POINTS_PER_SHARD`` points on a 64-bit ring, placed by hashing the
shard's identity (host, port and database, never the password or the URL's spelling)
with the point's number; a channel belongs to the first point at or after the hash of
its name. Adding a shard moves only the channels whose next point is now one of the
new shard's (about 1/N of them); the others stay where they were. Pure: no I/O.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from hashlib import blake2b

POINTS_PER_SHARD = 256


def _hash(text: str) -> int:
    return int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Maps channel names to shard indexes (positions in ``identities``)."""

    def __init__(self, identities: Sequence[str]) -> None:
        if not identities:
            raise ValueError("a hash ring needs at least one shard")
        if len(set(identities)) != len(identities):
            raise ValueError(f"shards must be distinct, got {list(identities)}")
        points = sorted(
            (_hash(f"{identity}#{i}"), index)
            for index, identity in enumerate(identities)
            for i in range(POINTS_PER_SHARD)
        )
        self._keys = [key for key, _ in points]
        self._owners = [owner for _, owner in points]
        self._single = len(identities) == 1

    def shard_of(self, channel: str) -> int:
        """Return the index of the shard that owns ``channel``."""
        if self._single:
            return 0
        i = bisect.bisect_left(self._keys, _hash(channel))
        return self._owners[i if i < len(self._keys) else 0]
