"""Pure-Python twin of ``relay._fastpath``: framing, outboxes, membership, fan-out.

This module is the reference implementation. ``relay/_fastpath.pyx`` must have the
same names, signatures, defaults, results, exceptions and messages; the
differential tests feed both the same inputs. Nothing here imports trio or touches
a socket: an :class:`Outbox` is a bounded byte queue that a connection's writer
task drains, and :func:`fanout` appends one shared frame to many outboxes.

Import it through :mod:`relay.fastpath`, never directly (tests and benchmarks
excepted).
"""

from __future__ import annotations

from os import write as _write_fd
from collections.abc import Iterator
from typing import Any

IMPLEMENTATION = "python"

# WebSocket opcodes (RFC 6455 section 5.2).
OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# Encodings a subscriber may use; index into the ``frames`` tuple of fanout().
ENC_JSON = 0
ENC_MSGPACK = 1
N_ENCODINGS = 2

# Slow-consumer policies.
POLICY_DISCONNECT = 0
POLICY_DROP = 1
POLICY_CONFLATE = 2

# Results of Outbox.offer().
OFFER_QUEUED = 0
OFFER_DROPPED = 1
OFFER_CONFLATED = 2
OFFER_OVERFLOW = 3
OFFER_CLOSED = 4

MAX_CONTROL_PAYLOAD = 125
_DATA_OPCODES = (OP_CONTINUATION, OP_TEXT, OP_BINARY)
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)


def frame_header(opcode: int, length: int) -> bytes:
    """Return the header of a final, unmasked server frame.

    Args:
        opcode: one of the ``OP_*`` constants.
        length: payload length in bytes.

    Raises:
        ValueError: the opcode is unknown, the length is negative or over 2**63-1,
            or a control frame's payload is over 125 bytes.
    """
    if opcode in _CONTROL_OPCODES:
        if length > MAX_CONTROL_PAYLOAD or length < 0:
            raise ValueError(
                f"control frame payload of {length} bytes exceeds {MAX_CONTROL_PAYLOAD}"
            )
    elif opcode not in _DATA_OPCODES:
        raise ValueError(f"unknown opcode {opcode}")
    if length < 0 or length > 0x7FFFFFFFFFFFFFFF:
        raise ValueError(f"invalid payload length {length}")
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 0x10000:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """Return one final, unmasked server frame holding ``payload``.

    Raises:
        ValueError: as :func:`frame_header`.
        TypeError: ``payload`` is not bytes.
    """
    if not isinstance(payload, bytes):
        raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
    return frame_header(opcode, len(payload)) + payload


class Outbox:
    """A connection's bounded queue of encoded frames, drained by its writer task.

    Control frames (``put``) are never dropped. Channel frames (``offer``) respect
    ``limit`` (bytes): when a frame does not fit, the channel's slow-consumer
    policy decides. Once a channel has dropped or conflated a frame, every later
    frame of that channel is dropped or conflated too until the writer drains the
    outbox with :meth:`take`, so a subscriber never sees a stale value after a
    fresh one and a gap is one contiguous range.
    """

    __slots__ = (
        "limit", "encoding", "owner", "_frames", "_size", "_closed",
        "_conflated", "_gaps", "dropped", "conflated", "queued",
        "fd", "_holds", "_dirty", "_rest",
    )

    def __init__(self, limit: int, encoding: int = ENC_JSON, owner: Any = None) -> None:
        if limit <= 0:
            raise ValueError(f"outbox limit must be > 0, got {limit}")
        if encoding < 0 or encoding >= N_ENCODINGS:
            raise ValueError(f"unknown encoding {encoding}")
        self.limit = limit
        self.encoding = encoding
        self.owner = owner
        self._frames: list[bytes] = []
        self._size = 0
        self._closed = False
        self._conflated: dict[Any, bytes] = {}
        self._gaps: dict[Any, list[int]] = {}
        self.dropped = 0
        self.conflated = 0
        self.queued = 0
        #: The socket's file descriptor for direct sends by :func:`flush`; -1: none.
        self.fd = -1
        self._holds = 0
        self._dirty = False
        #: What a direct send (:func:`flush`) could not write: possibly the rest of a
        #: frame already begun on the wire. First in line; never discarded.
        self._rest = b""

    @property
    def holds(self) -> int:
        """How many reasons currently forbid :func:`flush` to write directly."""
        return self._holds

    def hold(self) -> None:
        """Forbid direct writes by :func:`flush` until the matching :meth:`release`.

        Whoever else writes to the socket (the connection's writer task, the
        WebSocket library sending a ping, pong or close frame) holds the outbox while
        it does, so bytes never interleave.
        """
        self._holds += 1

    def release(self) -> None:
        """Undo one :meth:`hold`.

        Raises:
            ValueError: there is no hold to release.
        """
        if self._holds <= 0:
            raise ValueError("release() without a matching hold()")
        self._holds -= 1

    def mark_dirty(self, dirty: list[Any]) -> bool:
        """Append this outbox to ``dirty`` unless it is there already; True when appended."""
        if self._dirty:
            return False
        self._dirty = True
        dirty.append(self)
        return True

    @property
    def size(self) -> int:
        """Bytes waiting: queued frames plus held conflated values."""
        return self._size

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> bool:
        """True when :meth:`take` or :meth:`take_gaps` has something to return."""
        return bool(self._rest or self._frames or self._conflated or self._gaps)

    def put(self, frame: bytes) -> None:
        """Queue a control or direct-answer frame; never dropped, ignored once closed."""
        if self._closed:
            return
        self._frames.append(frame)
        self._size += len(frame)
        self.queued += 1

    def offer(self, key: Any, frame: bytes, policy: int, offset: int) -> int:
        """Queue a channel frame, or apply ``policy`` when it does not fit.

        Args:
            key: the channel the frame belongs to.
            frame: the encoded frame (shared between subscribers; not copied).
            policy: ``POLICY_DISCONNECT``, ``POLICY_DROP`` or ``POLICY_CONFLATE``.
            offset: the message's channel offset, for ``gap`` ranges.

        Returns:
            One of the ``OFFER_*`` constants. On ``OFFER_OVERFLOW`` the outbox is
            closed and emptied; the caller must close the connection (4002).
        """
        if self._closed:
            return OFFER_CLOSED
        n = len(frame)
        if policy == POLICY_CONFLATE:
            held = self._conflated.get(key)
            if held is not None:
                self._size += n - len(held)
                self._conflated[key] = frame
                self.conflated += 1
                return OFFER_CONFLATED
            if self._size + n > self.limit:
                self._conflated[key] = frame
                self._size += n
                self.conflated += 1
                return OFFER_CONFLATED
        elif policy == POLICY_DROP:
            gap = self._gaps.get(key)
            if gap is not None:
                gap[1] = offset
                self.dropped += 1
                return OFFER_DROPPED
            if self._size + n > self.limit:
                self._gaps[key] = [offset, offset]
                self.dropped += 1
                return OFFER_DROPPED
        elif policy == POLICY_DISCONNECT:
            if self._size + n > self.limit:
                self.close()
                return OFFER_OVERFLOW
        else:
            raise ValueError(f"unknown slow-consumer policy {policy}")
        self._frames.append(frame)
        self._size += n
        self.queued += 1
        return OFFER_QUEUED

    def take(self) -> bytes:
        """Return the rest of a direct send, every queued frame, then every held conflated
        value, and empty them."""
        frames = self._frames
        if self._conflated:
            frames.extend(self._conflated.values())
            self._conflated = {}
        self._frames = []
        self._size = 0
        rest, self._rest = self._rest, b""
        if rest:
            frames.insert(0, rest)
        if not frames:
            return b""
        if len(frames) == 1:
            return frames[0]
        return b"".join(frames)

    def take_rest(self) -> bytes:
        """Return (and forget) what a direct send could not write: whoever writes to the
        socket next must write it before anything else."""
        rest, self._rest = self._rest, b""
        self._size -= len(rest)
        return rest

    def take_gaps(self) -> list[tuple[Any, int, int]]:
        """Return and forget the pending gaps as ``(key, from_offset, to_offset)``."""
        if not self._gaps:
            return []
        gaps = [(key, r[0], r[1]) for key, r in self._gaps.items()]
        self._gaps = {}
        return gaps

    def close(self) -> None:
        """Discard everything waiting, except the rest of a direct send (a frame may be
        half on the wire); later ``put`` and ``offer`` are ignored."""
        self._closed = True
        self._frames = []
        self._conflated = {}
        self._gaps = {}
        self._size = len(self._rest)


class Members:
    """The subscribers of one channel: O(1) add, remove and membership test.

    Keeps a count per encoding so a publish encodes only what some member reads.
    """

    __slots__ = ("_items", "_index", "_counts")

    def __init__(self) -> None:
        self._items: list[Outbox] = []
        self._index: dict[Outbox, int] = {}
        self._counts = [0] * N_ENCODINGS

    def add(self, outbox: Outbox) -> bool:
        """Add ``outbox``; return False when it was already a member."""
        if outbox in self._index:
            return False
        self._index[outbox] = len(self._items)
        self._items.append(outbox)
        self._counts[outbox.encoding] += 1
        return True

    def remove(self, outbox: Outbox) -> bool:
        """Remove ``outbox`` (swap with the last member); return False when absent."""
        i = self._index.pop(outbox, None)
        if i is None:
            return False
        last = self._items.pop()
        if last is not outbox:
            self._items[i] = last
            self._index[last] = i
        self._counts[outbox.encoding] -= 1
        return True

    def count(self, encoding: int) -> int:
        """Return how many members read ``encoding``."""
        return self._counts[encoding]

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, outbox: object) -> bool:
        return outbox in self._index

    def __iter__(self) -> Iterator[Outbox]:
        return iter(list(self._items))


def _check_frames(members: Members, frames: tuple[bytes | None, ...]) -> None:
    for enc in range(N_ENCODINGS):
        if members._counts[enc] and frames[enc] is None:
            raise ValueError(f"no frame for encoding {enc}")


def fanout_into(
    members: Members,
    frames: tuple[bytes | None, ...],
    key: Any,
    policy: int,
    offset: int,
    dirty: list[Outbox],
) -> list[Any]:
    """Offer one message to every member and mark each touched outbox dirty.

    Like :func:`fanout`, but instead of returning the owners to wake, appends every
    outbox that accepted something to ``dirty`` (once: see :meth:`Outbox.mark_dirty`),
    for :func:`flush` to write at the end of the batch.

    Returns:
        The owners whose outbox overflowed under ``POLICY_DISCONNECT`` (close 4002).

    Raises:
        ValueError: a member's encoding has no frame (nothing was offered).
    """
    _check_frames(members, frames)
    overflowed: list[Any] = []
    for box in members._items:
        result = box.offer(key, frames[box.encoding], policy, offset)
        if result == OFFER_OVERFLOW:
            overflowed.append(box.owner)
        elif result != OFFER_CLOSED and not box._dirty:
            box._dirty = True
            dirty.append(box)
    return overflowed


def flush(dirty: list[Outbox], by_encoding: list[int] | None = None) -> tuple[list[Any], int]:
    """Write each dirty outbox to its socket with one non-blocking send, then clear ``dirty``.

    An outbox is written directly only when it has a socket (``fd >= 0``), no
    :meth:`~Outbox.hold` and no pending gap (gap frames are encoded by the caller).
    What the kernel does not take stays queued, first in line.

    Args:
        dirty: the outboxes to write.
        by_encoding: when given (``N_ENCODINGS`` numbers), the bytes written to outboxes
            of each encoding are added to its entry.

    Returns:
        ``(wake, sent)``: owners whose writer task must finish the job (held, no
        socket, a gap pending, or a partial send), and the bytes written.
    """
    wake: list[Any] = []
    sent = 0
    for box in dirty:
        box._dirty = False
        if not (box._rest or box._frames or box._conflated or box._gaps):
            continue
        if box.fd < 0 or box._holds or box._gaps:
            wake.append(box.owner)
            continue
        data = box.take()
        try:
            n = _write_fd(box.fd, data)
        except OSError:  # BlockingIOError: socket full; others: the writer meets them too
            n = 0
        sent += n
        if by_encoding is not None:
            by_encoding[box.encoding] += n
        if n < len(data):
            box._rest = data[n:]
            box._size = len(box._rest)
            wake.append(box.owner)
    dirty.clear()
    return wake, sent


def fanout(
    members: Members,
    frames: tuple[bytes | None, ...],
    key: Any,
    policy: int,
    offset: int,
) -> tuple[list[Any], list[Any]]:
    """Offer one message to every member, each getting the frame of its encoding.

    Args:
        members: the channel's subscribers.
        frames: one frame per encoding (``frames[ENC_JSON]``, ``frames[ENC_MSGPACK]``);
            an entry may be None only when no member uses that encoding.
        key, policy, offset: as :meth:`Outbox.offer`.

    Returns:
        ``(woken, overflowed)``: owners of outboxes that had nothing pending before
        and now do (their writers must be woken), and owners whose outbox
        overflowed under ``POLICY_DISCONNECT`` (they must be closed with 4002).

    Raises:
        ValueError: a member's encoding has no frame. Checked before any member
            is offered the message, so an error leaves every outbox untouched
            (otherwise owners already woken or overflowed would never be reported).
    """
    _check_frames(members, frames)
    woken: list[Any] = []
    overflowed: list[Any] = []
    for box in members._items:
        frame = frames[box.encoding]
        if frame is None:
            raise ValueError(f"no frame for encoding {box.encoding}")
        was_pending = box.pending
        result = box.offer(key, frame, policy, offset)
        if result == OFFER_OVERFLOW:
            overflowed.append(box.owner)
        elif not was_pending and result != OFFER_CLOSED:
            woken.append(box.owner)
    return woken, overflowed
