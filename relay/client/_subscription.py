"""The async iterators the application reads: :class:`Subscription` and :class:`EventStream`.

Both are bounded: a subscription buffers at most ``buffer_size`` messages (when it is full
the connection's reader waits: backpressure), an event stream at most ``buffer`` events
(then it raises EventsOverflow). The client fills them; nothing here does I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

import trio

from ._errors import ClientError, EventsOverflow, MessagesLost
from ._policy import Cursor
from ._types import Closed, Event, Message, Poke, Position

if TYPE_CHECKING:
    from ._base import _ClientBase
    from ._transport import _Connection

OnRecoveryLost = Literal["raise", "event"]
Since = Union[Position, tuple[str, int], str, None]


@dataclass(frozen=True, slots=True)
class SubscriptionStatistics:
    """A snapshot of one subscription (``Subscription.statistics()``)."""

    channel: str
    #: Messages received and not yet read by the application.
    buffered: int
    buffer_size: int
    #: Messages handed to the application.
    delivered: int
    #: Messages dropped because this subscription already had their offset.
    duplicates: int
    #: Times a delta did not apply to the value held and the full value was fetched again.
    resyncs: int = 0
    #: End-to-end latency (seconds from the server's ``ts`` to receipt here) of the
    #: latest messages (up to 1,024): median, 99th percentile and maximum; None before
    #: the first stamped message.
    latency_p50: float | None = None
    latency_p99: float | None = None
    latency_max: float | None = None


#: How many of a subscription's latest latencies its statistics summarise.
LATENCY_WINDOW = 1024


class _Stopped(Exception):
    """Marks a subscription the application ended (its iterator stops quietly)."""


_STOPPED = _Stopped()



class Subscription:
    """The messages of one channel, as an async iterator; from :meth:`Client.subscribe`.

    Iterating yields :class:`Message` (or :class:`Poke` on poke channels) in offset order,
    each once, across reconnections. It raises :class:`RecoveryLost` /
    :class:`MessagesSkipped` where messages were lost (with ``on_recovery_lost="raise"``;
    iterate again to continue), :class:`ClientClosed` once the client has stopped for good
    and every buffered message was read, and :class:`RequestFailed` if the server refused
    the subscription. It stops (``StopAsyncIteration``) after :meth:`unsubscribe` or when
    the application closed the client.

    Usable as an async context manager that unsubscribes on exit.
    """

    def __init__(self, client: _ClientBase, channel: str, since: Position | None,
                 on_recovery_lost: OnRecoveryLost, buffer_size: int) -> None:
        self.channel = channel
        self.on_recovery_lost = on_recovery_lost
        self._client = client
        self._cursor = Cursor(channel, since)
        self._capacity = buffer_size
        self._items: deque[Message | Poke | MessagesLost] = deque()
        self._messages = 0  # Message / Poke items in _items
        self._readable = trio.lowlevel.ParkingLot()
        self._room = trio.lowlevel.ParkingLot()
        #: The connection this subscription was last (re)subscribed on.
        self._conn: _Connection | None = None
        self._end: Exception | None = None
        self._confirmed = trio.Event()  # set at the first ``subscribed``, or at the end
        self._confirmed_ok = False
        self._delivered = 0
        self._duplicates = 0
        #: End-to-end latencies of the latest stamped messages (seconds).
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        # Deltas (state channels with delta = true): whether the server sends them to this
        # subscription (its last ``subscribed`` said so), the channel's value as of
        # ``_value_at`` (epoch, offset) -- private: the application gets copies -- and
        # whether a resubscription to fetch the full value is under way.
        self._delta = False
        self._value: Any = None
        self._value_at: tuple[str | None, int] | None = None
        self._resyncing = False
        self._resyncs = 0

    def __repr__(self) -> str:
        return f"<Subscription {self.channel!r} at {self.position}>"

    @property
    def epoch(self) -> str | None:
        """The channel's epoch as of the last ``subscribed`` (None before the first)."""
        return self._cursor.epoch

    @property
    def position(self) -> Position | None:
        """Where this subscription resumes from: the last message received, or None."""
        return self._cursor.since()

    def statistics(self) -> SubscriptionStatistics:
        p50 = p99 = top = None
        if self._latencies:
            ordered = sorted(self._latencies)
            n = len(ordered)
            p50, p99, top = ordered[(n - 1) // 2], ordered[min(n - 1, (n * 99) // 100)], ordered[-1]
        return SubscriptionStatistics(self.channel, self._messages, self._capacity,
                                      self._delivered, self._duplicates, self._resyncs,
                                      p50, p99, top)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message | Poke:
        """Return the next message, waiting for one.

        Cancelling it while it waits loses nothing: the message stays buffered.
        """
        while True:
            if self._items:
                item = self._items.popleft()
                if isinstance(item, MessagesLost):
                    raise item
                self._messages -= 1
                self._delivered += 1
                self._room.unpark_all()
                return item
            if self._end is not None:
                if self._end is _STOPPED:
                    raise StopAsyncIteration
                raise self._end
            await self._readable.park()

    async def wait_subscribed(self) -> None:
        """Wait until the server has confirmed this subscription (returns at once after that).

        Useful after subscribing while disconnected, before something else publishes.

        Raises:
            RequestFailed: the server refused the subscription.
            ClientClosed: the client stopped before the subscription was confirmed.
            ClientError: the subscription was unsubscribed before it was confirmed.
        """
        await self._confirmed.wait()
        if not self._confirmed_ok:
            assert self._end is not None
            if self._end is _STOPPED:
                raise ClientError(f"the subscription to {self.channel!r} ended before it was confirmed")
            raise self._end

    async def unsubscribe(self) -> None:
        """Leave the channel: the iterator stops at once and buffered messages are discarded.

        Waits for the server's ``unsubscribed`` when connected (up to ``request_timeout``).
        Cancelling it halfway leaves the channel locally all the same.

        Raises:
            RequestTimeout: the server did not answer in time.
        """
        await self._client._unsubscribe(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._end is None:
            await self.unsubscribe()

    # -- called by the client ---------------------------------------------------------

    def _has_room(self) -> bool:
        return self._messages < self._capacity

    def _append(self, item: Message | Poke) -> None:
        self._items.append(item)
        self._messages += 1
        self._readable.unpark_all()

    async def _put(self, item: Message | Poke) -> None:
        """Buffer ``item``, waiting while the buffer is full (unless the subscription ends)."""
        while not self._has_room() and self._end is None:
            await self._room.park()
        if self._end is None:
            self._append(item)

    def _put_lost(self, error: MessagesLost) -> None:
        """Queue ``error`` to be raised in stream order (not counted against the buffer)."""
        self._items.append(error)
        self._readable.unpark_all()

    def _mark_subscribed(self) -> None:
        self._confirmed_ok = True
        self._confirmed.set()

    def _finish(self, end: Exception, *, discard: bool = False) -> None:
        self._confirmed.set()  # wakes wait_subscribed (which then raises unless confirmed)
        if self._end is None:
            self._end = end
        if discard:
            self._items.clear()
            self._messages = 0
        self._readable.unpark_all()
        self._room.unpark_all()



class EventStream:
    """An async iterator over a client's events (:meth:`Client.events`)."""

    def __init__(self, client: _ClientBase, buffer: int) -> None:
        self._client = client
        self._buffer = buffer
        self._items: deque[Event] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self._overflowed = False
        self._ended = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        """Return the next event; stops after :class:`Closed`.

        Raises:
            EventsOverflow: this listener fell more than ``buffer`` events behind (after
                the events it holds were read).
        """
        while not self._items:
            if self._overflowed:
                raise EventsOverflow(
                    f"events listener fell more than buffer={self._buffer} events behind")
            if self._ended:
                raise StopAsyncIteration
            await self._lot.park()
        return self._items.popleft()

    def close(self) -> None:
        """Stop listening."""
        self._ended = True
        self._client._listeners.discard(self)
        self._lot.unpark_all()

    def _push(self, event: Event) -> None:
        if len(self._items) >= self._buffer:
            self._overflowed = True
            self._client._listeners.discard(self)
        else:
            self._items.append(event)
        if isinstance(event, Closed):
            self._ended = True
        self._lot.unpark_all()



def _as_position(since: Since) -> Position | None:
    if since is None or isinstance(since, Position):
        return since
    if isinstance(since, str):
        return Position.parse(since)
    epoch, offset = since
    if not isinstance(epoch, str) or isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"since must be (epoch: str, offset: int >= 0), got {since!r}")
    return Position(epoch, offset)

