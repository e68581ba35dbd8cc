"""Values the Python client hands to the application: messages, acks, positions, states, events.

All frozen dataclasses (and one enum); no trio, no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Union

from ._errors import ClientClosed, MessagesLost


@dataclass(frozen=True, slots=True)
class Position:
    """A place in a channel: an epoch and an offset within it (``EPOCH:OFFSET`` as text)."""

    epoch: str
    offset: int

    def __str__(self) -> str:
        return f"{self.epoch}:{self.offset}"

    @classmethod
    def parse(cls, text: str) -> Position:
        """Parse ``EPOCH:OFFSET`` (the form ``str()`` gives and ``relay sub --since`` takes).

        Raises:
            ValueError: ``text`` is not an epoch, a colon and an integer >= 0.
        """
        epoch, sep, offset = text.rpartition(":")
        if not sep or not epoch or not offset.isdigit():
            raise ValueError(f"expected EPOCH:OFFSET such as 1b0502ed:17, got {text!r}")
        return cls(epoch, int(offset))


@dataclass(frozen=True, slots=True)
class Message:
    """A message of a channel, delivered in offset order, each one once.

    ``ts`` is when the server took the publish (unix seconds, stamped at ingress by the
    node the publisher used; None from a server that sends no ``ts``); ``received`` is when
    this client read it (unix seconds). :attr:`latency` is the difference: end-to-end
    latency, meaningful across machines as far as their clocks agree. Neither takes part
    in comparisons: two deliveries of one message are equal.
    """

    channel: str
    offset: int
    data: Any
    epoch: str
    ts: float | None = field(default=None, compare=False)
    received: float | None = field(default=None, compare=False)

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.offset)

    @property
    def latency(self) -> float | None:
        """Seconds from the publish (``ts``) to its receipt here, or None without ``ts``."""
        return _latency(self.ts, self.received)


@dataclass(frozen=True, slots=True)
class Poke:
    """On a ``poke`` channel: new data up to ``offset``; fetch it over HTTP (history endpoint).

    ``data`` is always None (it is there so ``msg.data`` works on either kind); ``ts``,
    ``received`` and :attr:`latency` as on :class:`Message`.
    """

    channel: str
    offset: int
    epoch: str
    data: None = None
    ts: float | None = field(default=None, compare=False)
    received: float | None = field(default=None, compare=False)

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.offset)

    @property
    def latency(self) -> float | None:
        """Seconds from the publish (``ts``) to its receipt here, or None without ``ts``."""
        return _latency(self.ts, self.received)


def _latency(ts: float | None, received: float | None) -> float | None:
    if ts is None or received is None:
        return None
    return received - ts


@dataclass(frozen=True, slots=True)
class Ack:
    """The server's acknowledgement of a publish: where the message went."""

    channel: str
    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Member:
    """A member of a presence channel: one subscribed connection.

    ``user`` is the token's ``sub`` ("" without authentication), ``conn`` the connection's
    session id, ``joined`` when it subscribed (unix seconds), ``info`` the token's
    ``info`` claim (None without one).
    """

    user: str
    conn: str
    joined: float
    info: Any = None


@dataclass(frozen=True, slots=True)
class PresenceStats:
    """A presence channel's counts: subscribed connections and distinct users."""

    channel: str
    connections: int
    users: int


class ClientState(enum.Enum):
    """Where the client's connection stands (``Client.state``)."""

    CONNECTING = "connecting"      # opening a connection (TCP, handshake, welcome)
    CONNECTED = "connected"        # welcome received; requests go out at once
    RECONNECTING = "reconnecting"  # waiting out the backoff delay before the next attempt
    CLOSED = "closed"              # for good: closed by the application or by the server


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connecting:
    """An attempt to connect begins (``attempt`` 0 is the first connection)."""

    attempt: int
    url: str


@dataclass(frozen=True, slots=True)
class Connected:
    """The server sent ``welcome``: the connection is usable."""

    session: str
    node: str


@dataclass(frozen=True, slots=True)
class Disconnected:
    """A connection ended, or an attempt failed before the WebSocket opened.

    ``code`` is the WebSocket close code (1006 when the TCP connection dropped without
    one), or None when no WebSocket was open (refused TCP connection, timeout, a
    handshake refused with ``http_status``). ``reason`` says what happened.
    """

    code: int | None
    reason: str
    http_status: int | None = None


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """The client waits ``delay`` seconds, then makes reconnection attempt ``attempt`` (1, 2, ...)."""

    attempt: int
    delay: float


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The server confirmed a (re)subscription: ``channel`` is at ``epoch``:``offset``.

    ``recovered`` is the server's answer to ``since`` (False without one); when a
    ``since`` could not be recovered a :class:`Lost` event follows.
    """

    channel: str
    epoch: str
    offset: int
    recovered: bool


@dataclass(frozen=True, slots=True)
class Lost:
    """Messages of a channel will not reach the application (a RecoveryLost or MessagesSkipped).

    Emitted whatever ``on_recovery_lost`` says; with ``"raise"`` the subscription's
    iterator also raises ``error`` at the point in the stream where the loss happened.
    """

    error: MessagesLost


@dataclass(frozen=True, slots=True)
class Join:
    """``member`` subscribed to ``channel`` (a channel with ``join_leave = true``).

    Only for channels this client is subscribed to; a ``presence_diff`` of the server
    arrives as its :class:`Leave` events first, then its :class:`Join` events.
    """

    channel: str
    member: Member


@dataclass(frozen=True, slots=True)
class Leave:
    """``member`` unsubscribed from ``channel``, disconnected, or its node died."""

    channel: str
    member: Member


@dataclass(frozen=True, slots=True)
class Closed:
    """The client stopped for good: ``error`` is None when the application closed it."""

    error: ClientClosed | None


Event = Union[Connecting, Connected, Disconnected, Reconnecting, Subscribed, Lost, Join, Leave, Closed]
