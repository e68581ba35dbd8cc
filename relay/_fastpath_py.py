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


def _payload_start(frame: bytes, opcode: int) -> int:
    """Return where the payload of ``frame`` starts when ``frame`` is exactly one final,
    unmasked frame with ``opcode`` (no extension bits), else -1."""
    n = len(frame)
    if n < 2 or frame[0] != 0x80 | opcode:
        return -1
    second = frame[1]
    if second & 0x80:
        return -1
    if second < 126:
        return 2 if n == 2 + second else -1
    if second == 126:
        return 4 if n >= 4 and n == 4 + int.from_bytes(frame[2:4], "big") else -1
    return 10 if n >= 10 and n == 10 + int.from_bytes(frame[2:10], "big") else -1


def encode_batch(encoding: int, frames: list[bytes]) -> bytes:
    """Return one frame whose payload is the array of the payloads of ``frames``.

    The payloads are already-encoded messages: for ``ENC_JSON`` the result is a text
    frame ``[p1,p2,...]``, for ``ENC_MSGPACK`` a binary frame holding a MessagePack
    array header followed by the payloads. Nothing is decoded or re-encoded.

    Args:
        encoding: ``ENC_JSON`` or ``ENC_MSGPACK``.
        frames: frames as built by :func:`encode_frame`: each exactly one final,
            unmasked text (JSON) or binary (MessagePack) frame.

    Raises:
        ValueError: the encoding is unknown, or a frame is not one complete frame of
            the encoding's opcode.
        TypeError: ``frames`` is not a list, or one of them is not bytes.
    """
    if encoding == ENC_JSON:
        opcode, kind = OP_TEXT, "text"
    elif encoding == ENC_MSGPACK:
        opcode, kind = OP_BINARY, "binary"
    else:
        raise ValueError(f"unknown encoding {encoding}")
    if not isinstance(frames, list):
        raise TypeError(f"frames must be a list, not {type(frames).__name__}")
    payloads = []
    for i, frame in enumerate(frames):
        if type(frame) is not bytes:
            raise TypeError(f"frame {i} must be bytes, not {type(frame).__name__}")
        start = _payload_start(frame, opcode)
        if start < 0:
            raise ValueError(f"frame {i} is not one complete, final, unmasked {kind} frame")
        payloads.append(frame[start:])
    n = len(payloads)
    if opcode == OP_TEXT:
        payload = b"[" + b",".join(payloads) + b"]"
    else:
        if n < 16:
            head = bytes((0x90 | n,))
        elif n < 0x10000:
            head = b"\xdc" + n.to_bytes(2, "big")
        else:
            head = b"\xdd" + n.to_bytes(4, "big")
        payload = head + b"".join(payloads)
    return frame_header(opcode, len(payload)) + payload


class Outbox:
    """A connection's bounded queue of encoded frames, drained by its writer task.

    Control frames (``put``) are never dropped. Channel frames (``offer``) respect
    ``limit`` (bytes): when a frame does not fit, the channel's slow-consumer
    policy decides. Once a channel has dropped or conflated a frame, every later
    frame of that channel is dropped or conflated too until the writer drains the
    outbox with :meth:`take`, so a subscriber never sees a stale value after a
    fresh one and a gap is one contiguous range. A conflating outbox stays so
    (:attr:`behind`) until a write leaves nothing waiting: the writer and :func:`flush`
    clear it.
    """

    __slots__ = (
        "limit", "encoding", "owner", "_frames", "_size", "_closed",
        "_conflated", "_gaps", "dropped", "conflated", "queued",
        "fd", "_holds", "_dirty", "_rest", "_batched", "_plain", "_slots", "superseded",
        "oldest", "behind",
    )

    def __init__(self, limit: int, encoding: int = ENC_JSON, owner: Any = None) -> None:
        if limit <= 0:
            raise ValueError(f"outbox limit must be > 0, got {limit}")
        if encoding < 0 or encoding >= N_ENCODINGS:
            raise ValueError(f"unknown encoding {encoding}")
        self.limit = limit
        self.encoding = encoding
        self.owner = owner
        self._frames: list[bytes | None] = []
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
        #: Batching (ticks, see :meth:`start_batching`): whether it is on, how many
        #: frames at the head of the queue were queued before it was switched on, the
        #: index in the queue of the newest frame of each "latest" key (state channels)
        #: and how many frames a newer one of the same key took out of a batch.
        self._batched = False
        self._plain = 0
        self._slots: dict[Any, int] = {}
        self.superseded = 0
        #: The ``stamp`` given with the oldest channel frame still waiting (queued or held
        #: by conflation; see :meth:`offer`); 0.0 when none waits. The writer's lag.
        self.oldest = 0.0
        #: A value was held (conflated): until a write leaves nothing waiting (the
        #: writer or :func:`flush` clears it), every later conflate-policy frame is held too.
        self.behind = False

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
    def batched(self) -> bool:
        """True once :meth:`start_batching` was called."""
        return self._batched

    def start_batching(self) -> None:
        """Send data frames in batches from now on (ticks); cannot be undone.

        :meth:`take` then returns each run of data frames (complete, final, unmasked
        frames of this encoding's opcode, as ``bytes``) as one frame whose payload is an
        array of theirs (:func:`encode_batch`); anything else (control frames such as
        pings) leaves as it is, in order, between runs. Frames queued before this call
        leave as they are. Offers and puts with a "latest" key keep only the newest frame
        of that key per batch. The outbox never joins a dirty list again: :func:`flush`
        skips it, and whoever drives the ticks writes it (:func:`flush_tick`).
        """
        if not self._batched:
            self._batched = True
            self._plain = len(self._frames)
            self._dirty = True

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> bool:
        """True when :meth:`take` or :meth:`take_gaps` has something to return."""
        return bool(self._rest or self._frames or self._conflated or self._gaps)

    def put(self, frame: bytes, latest: Any = None) -> None:
        """Queue a control or direct-answer frame; never dropped, ignored once closed.

        Args:
            frame: the encoded frame.
            latest: on a batched outbox, a key (a state channel's name) whose older
                frame still waiting for the batch, or held conflated value, this frame
                replaces. Ignored when None or when the outbox is not batched.
        """
        if self._closed:
            return
        if latest is not None and self._batched:
            i = self._slots.get(latest)
            if i is not None:
                self._supersede(i)
            held = self._conflated.pop(latest, None)
            if held is not None:
                self._size -= len(held)
                self.superseded += 1
            self._slots[latest] = len(self._frames)
        self._frames.append(frame)
        self._size += len(frame)
        self.queued += 1

    def _supersede(self, i: int) -> None:
        """Take the frame at index ``i`` out of the batch (a newer one of its key came)."""
        old = self._frames[i]
        assert old is not None
        self._frames[i] = None
        self._size -= len(old)
        self.superseded += 1

    def offer(self, key: Any, frame: bytes, policy: int, offset: int, latest: bool = False,
              full: bytes | None = None, stamp: float = 0.0) -> int:
        """Queue a channel frame, or apply ``policy`` when it does not fit.

        Args:
            key: the channel the frame belongs to.
            frame: the encoded frame (shared between subscribers; not copied).
            policy: ``POLICY_DISCONNECT``, ``POLICY_DROP`` or ``POLICY_CONFLATE``.
            offset: the message's channel offset, for ``gap`` ranges.
            latest: on a batched outbox (ticks), keep only the newest frame of ``key``
                in a batch: an older one still waiting is taken out (a state channel).
                The policy's size check counts the bytes that removal frees.
            full: when given, what to keep instead of ``frame`` whenever the frame would
                not follow the previous frame of ``key`` on the wire: when it is held
                (conflated) or takes an older frame of ``key`` out of a batch. A delta
                channel passes the full value here and a patch as ``frame`` (a patch
                applies only right after its base). The size check uses ``frame``.
            stamp: when the message was handed out (any clock); becomes :attr:`oldest`
                when nothing else waits and the frame is queued or held.

        Returns:
            One of the ``OFFER_*`` constants. On ``OFFER_OVERFLOW`` the outbox is
            closed and emptied; the caller must close the connection (4002).
        """
        if self._closed:
            return OFFER_CLOSED
        result = self._offer(key, frame, policy, offset, latest, full)
        if (result == OFFER_QUEUED or result == OFFER_CONFLATED) and self.oldest == 0.0:
            self.oldest = stamp
        return result

    @property
    def depth(self) -> int:
        """Frames waiting: queued (a batch's replaced values not counted) and held."""
        n = len(self._frames) + len(self._conflated)
        if self._batched:
            n -= self._frames.count(None)
        return n

    def _offer(self, key: Any, frame: bytes, policy: int, offset: int, latest: bool,
               full: bytes | None) -> int:
        n = len(frame)
        slot = -1
        freed = 0
        if latest and self._batched:
            found = self._slots.get(key)
            if found is not None:
                slot = found
                freed = len(self._frames[slot])  # type: ignore[arg-type]
        if policy == POLICY_CONFLATE:
            held = self._conflated.get(key)
            if held is not None:
                if full is not None:
                    frame, n = full, len(full)
                if slot >= 0:
                    self._supersede(slot)
                    del self._slots[key]
                self._size += n - len(held)
                # Moved to the end: held values leave in the order of their offsets.
                del self._conflated[key]
                self._conflated[key] = frame
                self.conflated += 1
                return OFFER_CONFLATED
            # Once one value is held, so is every later one (per key): the held values then
            # all come after the queued frames, so offsets never go backwards on the wire.
            # And until a write leaves nothing behind (``behind``): what a subscriber that
            # fell behind gets next is the newest value per key, not a queue of old ones.
            if self._conflated or self.behind or self._size - freed + n > self.limit:
                self.behind = True
                if full is not None:
                    frame, n = full, len(full)
                if slot >= 0:
                    self._supersede(slot)
                    del self._slots[key]
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
            if self._size - freed + n > self.limit:
                self._gaps[key] = [offset, offset]
                self.dropped += 1
                return OFFER_DROPPED
        elif policy == POLICY_DISCONNECT:
            if self._size - freed + n > self.limit:
                self.close()
                return OFFER_OVERFLOW
        else:
            raise ValueError(f"unknown slow-consumer policy {policy}")
        if slot >= 0:
            self._supersede(slot)
            if full is not None:
                frame, n = full, len(full)
        if latest and self._batched:
            self._slots[key] = len(self._frames)
        self._frames.append(frame)
        self._size += n
        self.queued += 1
        return OFFER_QUEUED

    def take(self) -> bytes:
        """Return the rest of a direct send, every queued frame, then every held conflated
        value, and empty them (:attr:`oldest` becomes 0.0).

        On a batched outbox (:meth:`start_batching`) each run of data frames among them
        leaves as one batch frame (:func:`encode_batch`).
        """
        self.oldest = 0.0
        if self._batched:
            return self._take_batch()
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
            return frames[0]  # type: ignore[return-value]
        return b"".join(frames)  # type: ignore[arg-type]

    def _take_batch(self) -> bytes:
        frames = self._frames
        if self._conflated:
            frames.extend(self._conflated.values())
            self._conflated = {}
        plain = self._plain
        self._frames = []
        self._slots = {}
        self._plain = 0
        self._size = 0
        rest, self._rest = self._rest, b""
        out: list[bytes] = [rest] if rest else []
        out.extend(frames[:plain])  # type: ignore[arg-type]
        opcode = OP_BINARY if self.encoding == ENC_MSGPACK else OP_TEXT
        run: list[bytes] = []
        for i in range(plain, len(frames)):
            frame = frames[i]
            if frame is None:
                continue  # superseded by a newer frame of its key
            if type(frame) is bytes and _payload_start(frame, opcode) >= 0:
                run.append(frame)
                continue
            if run:
                out.append(encode_batch(self.encoding, run))
                run = []
            out.append(frame)
        if run:
            out.append(encode_batch(self.encoding, run))
        if not out:
            return b""
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def written(self) -> None:
        """A write of what :meth:`take` returned has completed: when nothing waits any
        more, the subscriber keeps up again and conflation stops (:attr:`behind`)."""
        if not self.pending:
            self.behind = False

    def take_rest(self) -> bytes:
        """Return (and forget) what a direct send could not write: whoever writes to the
        socket next must write it before anything else."""
        rest, self._rest = self._rest, b""
        self._size -= len(rest)
        if not (self._frames or self._conflated):
            self.oldest = 0.0
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
        self._slots = {}
        self._plain = 0
        self._size = len(self._rest)
        self.oldest = 0.0


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
    latest: bool = False,
    full: tuple[bytes | None, ...] | None = None,
    stamp: float = 0.0,
) -> list[Any]:
    """Offer one message to every member and mark each touched outbox dirty.

    Like :func:`fanout`, but instead of returning the owners to wake, appends every
    outbox that accepted something to ``dirty`` (once: see :meth:`Outbox.mark_dirty`),
    for :func:`flush` to write at the end of the batch. Batched outboxes never join
    ``dirty`` (their tick writes them); ``latest`` and ``stamp`` are passed to
    :meth:`Outbox.offer`, and so is ``full[encoding]`` when ``full`` is given (one frame
    per encoding, like ``frames``: the full value of a delta channel whose ``frames``
    hold a patch).

    Returns:
        The owners whose outbox overflowed under ``POLICY_DISCONNECT`` (close 4002).

    Raises:
        ValueError: a member's encoding has no frame in ``frames`` or in ``full``
            (nothing was offered).
    """
    _check_frames(members, frames)
    if full is not None:
        _check_frames(members, full)
    overflowed: list[Any] = []
    for box in members._items:
        result = box.offer(key, frames[box.encoding], policy, offset, latest,
                           None if full is None else full[box.encoding], stamp)
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
    What the kernel does not take stays queued, first in line. A batched outbox
    (:meth:`Outbox.start_batching`) is skipped: its tick writes it (:func:`flush_tick`).

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
        if box._batched:
            continue  # it stays "dirty" for good, so it never joins a dirty list again
        box._dirty = False
        sent += _write_direct(box, wake, by_encoding)
    dirty.clear()
    return wake, sent


def _write_direct(box: Outbox, wake: list[Any], by_encoding: list[int] | None) -> int:
    """Write what ``box`` holds with one non-blocking send; return the bytes written."""
    if not (box._rest or box._frames or box._conflated or box._gaps):
        return 0
    if box.fd < 0 or box._holds or box._gaps:
        wake.append(box.owner)
        return 0
    oldest = box.oldest
    data = box.take()
    try:
        n = _write_fd(box.fd, data)
    except OSError:  # BlockingIOError: socket full; others: the writer meets them too
        n = 0
    if by_encoding is not None:
        by_encoding[box.encoding] += n
    if n < len(data):
        box._rest = data[n:]
        box._size = len(box._rest)
        box.oldest = oldest  # (its oldest frame has not left entirely)
        wake.append(box.owner)
    else:
        box.written()
    return n


def flush_tick(members: Members, by_encoding: list[int] | None = None) -> tuple[list[Any], int]:
    """Write every outbox of ``members`` that has something pending, like :func:`flush`.

    Called once per tick for the outboxes on that tick: a batched outbox's queue leaves
    as batch frames (:meth:`Outbox.take`). Same conditions and results as :func:`flush`;
    ``members`` is left as it is.
    """
    wake: list[Any] = []
    sent = 0
    for box in members._items:  # (nothing in here adds or removes members)
        sent += _write_direct(box, wake, by_encoding)
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


# ---------------------------------------------------------------------------- client frames

#: Why :func:`scan_client_frames` stopped: the rest is an incomplete frame (or nothing),
#: wait for more bytes.
SCAN_MORE = 0
#: ... or the frame there is one the fast path leaves to wsproto (a fragment, reserved
#: bits, an unmasked frame, an unknown opcode, a non-minimal length, a data frame over
#: ``max_size``, a control frame that breaks RFC 6455's rules, a text frame that is not
#: UTF-8): hand it, and everything after it, to wsproto.
SCAN_OTHER = 1
#: ... or the last frame returned is a control frame (close, ping, pong): have wsproto
#: parse it, and act on it, before scanning what follows it.
SCAN_CONTROL = 2


def scan_client_frames(data: bytes | bytearray, max_size: int) -> tuple[list[tuple[int, Any]], int, int]:
    """Split the complete client frames at the start of ``data`` (RFC 6455, as a server reads them).

    Returns ``(frames, consumed, stop)``:

    - ``frames``: ``(opcode, value)`` for each frame, in order. A final, masked text
      frame (no reserved bits) of at most ``max_size`` bytes gives its payload unmasked
      and decoded (``str``; not UTF-8: the scan stops there with ``SCAN_OTHER``), such a
      binary frame its unmasked payload (``bytes``). A final, masked close, ping or pong
      frame with at most 125 bytes gives its *raw bytes* (``bytes``, still masked), for
      wsproto to parse, and ends the scan (``SCAN_CONTROL``).
    - ``consumed``: how many bytes of ``data`` those frames took.
    - ``stop``: ``SCAN_MORE`` (what follows is an incomplete frame, or nothing),
      ``SCAN_OTHER`` (the frame at ``consumed`` is one to leave to wsproto) or
      ``SCAN_CONTROL`` (the last frame is a control frame).
    """
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"data must be bytes or bytearray, not {type(data).__name__}")
    if not isinstance(max_size, int):
        raise TypeError(f"max_size must be an int, not {type(max_size).__name__}")
    frames: list[tuple[int, Any]] = []
    n = len(data)
    pos = 0
    while True:
        if n - pos < 2:
            return frames, pos, SCAN_MORE
        first, second = data[pos], data[pos + 1]
        opcode = first & 0x0F
        length = second & 0x7F
        if first & 0xF0 != 0x80 or not second & 0x80:  # not final, reserved bits, unmasked
            return frames, pos, SCAN_OTHER
        if opcode in (OP_TEXT, OP_BINARY):
            if length == 126:
                if n - pos < 4:
                    return frames, pos, SCAN_MORE
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
                if length < 126:
                    return frames, pos, SCAN_OTHER
                head = 8
            elif length == 127:
                if n - pos < 10:
                    return frames, pos, SCAN_MORE
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                if length < 65536 or length >> 63:  # not minimal, or the top bit set
                    return frames, pos, SCAN_OTHER
                head = 14
            else:
                head = 6
            if length > max_size:
                return frames, pos, SCAN_OTHER
        elif opcode in _CONTROL_OPCODES:
            if length > MAX_CONTROL_PAYLOAD:
                return frames, pos, SCAN_OTHER
            head = 6
        else:
            return frames, pos, SCAN_OTHER
        end = pos + head + length
        if end > n:
            return frames, pos, SCAN_MORE
        if opcode in _CONTROL_OPCODES:
            frames.append((opcode, bytes(data[pos:end])))
            return frames, end, SCAN_CONTROL
        else:
            mask = data[pos + head - 4:pos + head]
            payload = bytes(data[pos + head:end])
            if payload:
                key = int.from_bytes((mask * (length // 4 + 1))[:length], "big")
                payload = (int.from_bytes(payload, "big") ^ key).to_bytes(length, "big")
            if opcode == OP_TEXT:
                try:
                    frames.append((opcode, payload.decode("utf-8")))
                except UnicodeDecodeError:
                    return frames, pos, SCAN_OTHER
            else:
                frames.append((opcode, payload))
        pos = end
