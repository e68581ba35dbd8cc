"""Typed contract of the fast path, met by ``relay._fastpath`` and ``relay._fastpath_py``.

Only what is written here is promised. Both implementations also agree on
results and error messages for odd inputs the differential tests cover, but code
should stay within these types.
"""

from collections.abc import Iterator
from typing import Any, Final, final

IMPLEMENTATION: Final[str]

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

ENC_JSON: Final = 0
ENC_MSGPACK: Final = 1
N_ENCODINGS: Final = 2

POLICY_DISCONNECT: Final = 0
POLICY_DROP: Final = 1
POLICY_CONFLATE: Final = 2

OFFER_QUEUED: Final = 0
OFFER_DROPPED: Final = 1
OFFER_CONFLATED: Final = 2
OFFER_OVERFLOW: Final = 3
OFFER_CLOSED: Final = 4

MAX_CONTROL_PAYLOAD: Final = 125

def frame_header(opcode: int, length: int) -> bytes: ...
def encode_frame(opcode: int, payload: bytes) -> bytes: ...
def encode_batch(encoding: int, frames: list[bytes]) -> bytes: ...
@final
class Outbox:
    limit: int
    owner: Any
    dropped: int
    conflated: int
    queued: int
    superseded: int
    fd: int
    oldest: float
    behind: bool
    def __init__(self, limit: int, encoding: int = 0, owner: Any = None) -> None: ...
    @property
    def holds(self) -> int: ...
    def hold(self) -> None: ...
    def release(self) -> None: ...
    def mark_dirty(self, dirty: list[Outbox]) -> bool: ...
    @property
    def encoding(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def pending(self) -> bool: ...
    @property
    def batched(self) -> bool: ...
    def start_batching(self) -> None: ...
    def put(self, frame: bytes, latest: Any = None) -> None: ...
    def offer(self, key: Any, frame: bytes, policy: int, offset: int, latest: bool = False,
              full: bytes | None = None, stamp: float = 0.0) -> int: ...
    @property
    def depth(self) -> int: ...
    def take(self) -> bytes: ...
    def written(self) -> None: ...
    def take_rest(self) -> bytes: ...
    def take_gaps(self) -> list[tuple[Any, int, int]]: ...
    def close(self) -> None: ...

@final
class Members:
    def __init__(self) -> None: ...
    def add(self, outbox: Outbox) -> bool: ...
    def remove(self, outbox: Outbox) -> bool: ...
    def count(self, encoding: int) -> int: ...
    def __len__(self) -> int: ...
    def __contains__(self, outbox: object, /) -> bool: ...
    def __iter__(self) -> Iterator[Outbox]: ...

def fanout(
    members: Members,
    frames: tuple[bytes | None, ...],
    key: Any,
    policy: int,
    offset: int,
) -> tuple[list[Any], list[Any]]: ...

def fanout_into(
    members: Members,
    frames: tuple[bytes | None, ...],
    key: Any,
    policy: int,
    offset: int,
    dirty: list[Outbox],
    latest: bool = False,
    full: tuple[bytes | None, ...] | None = None,
    stamp: float = 0.0,
) -> list[Any]: ...
def flush(dirty: list[Outbox], by_encoding: list[int] | None = None) -> tuple[list[Any], int]: ...
def flush_tick(members: Members, by_encoding: list[int] | None = None) -> tuple[list[Any], int]: ...

SCAN_MORE: Final = 0
SCAN_OTHER: Final = 1
SCAN_CONTROL: Final = 2

def scan_client_frames(data: bytes | bytearray, max_size: int) -> tuple[list[tuple[int, Any]], int, int]: ...
