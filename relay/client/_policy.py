"""The Python client's protocol decisions, sans-IO: backoff, close codes, and channel cursors.

* :func:`backoff_delay`: exponential backoff with full jitter.
* :func:`decide_close` / :func:`decide_rejection`: what a close code (PROTOCOL.md's table) or
  a refused handshake means for the client: reconnect (with the server's hint or a longer
  backoff), get a new token first, or stop.
* :class:`Cursor`: where one subscription stands (epoch, last offset); what to send as
  ``since``; which messages are duplicates; when the application must be told that
  messages were lost.

No trio, no sockets, no clock; randomness arrives as an argument. The trio shell
(:mod:`relay.client._client`) calls these and does what they return.
"""

from __future__ import annotations

import enum
import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from ._errors import MessagesSkipped, RecoveryLost
from ._types import Position

#: Close codes after which the client does not reconnect (PROTOCOL.md).
NO_RECONNECT_CODES = frozenset({1000, 1008})
#: Close codes that ask for a longer backoff: 1013 try again later, 4003 rate limited.
LONGER_BACKOFF_CODES = frozenset({1013, 4003})
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_GOING_AWAY = 1001
#: A longer backoff starts this many doublings further (8x the cap with factor 2).
LONGER_BACKOFF_STEPS = 3
#: A connection that stayed up this long resets the attempt counter; a shorter one does
#: not, so a server that accepts and at once closes is not hammered at the minimum delay.
STABLE_CONNECTION_SECONDS = 5.0
#: Exponents beyond this give max_backoff anyway; stops factor ** attempt overflowing.
_MAX_EXPONENT = 64


def backoff_cap(attempt: int, *, min_backoff: float, max_backoff: float, factor: float) -> float:
    """Return the largest delay of reconnection attempt ``attempt`` (1, 2, ...).

    ``min(max_backoff, min_backoff * factor ** (attempt - 1))``: the first attempt waits at
    most ``min_backoff``, each further one up to ``factor`` times longer, never more than
    ``max_backoff``.
    """
    exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
    return float(min(max_backoff, min_backoff * factor ** exponent))


def backoff_delay(attempt: int, *, min_backoff: float, max_backoff: float, factor: float,
                  rand: Callable[[], float] = random.random) -> float:
    """Return the delay before reconnection attempt ``attempt``, with full jitter.

    Uniform in ``[0, backoff_cap(attempt)]`` ("full jitter"), so clients that lost their
    connections at the same moment do not come back at the same moment.

    Args:
        attempt: 1 for the first reconnection attempt after a connection was lost.
        min_backoff, max_backoff, factor: see :func:`relay.client.connect`.
        rand: a function returning a float in ``[0, 1)``.
    """
    return rand() * backoff_cap(attempt, min_backoff=min_backoff, max_backoff=max_backoff,
                                factor=factor)


class Action(enum.Enum):
    RECONNECT = "reconnect"
    REFRESH_TOKEN = "refresh_token"  # get a new token from token_callback, then reconnect
    STOP = "stop"                    # do not reconnect; the client closes with an error


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after a connection ended or an attempt failed."""

    action: Action
    #: Seconds the server asked the client to wait (1001 with ``reconnect_after_ms``).
    hint: float | None = None
    #: Back off longer than usual (1013, 4003, HTTP 429).
    longer: bool = False


def parse_reconnect_hint(reason: str | None) -> float | None:
    """Return the seconds of a ``{"reconnect_after_ms": N}`` close reason, or None.

    Anything else (no reason, not JSON, no such key, not a number >= 0) gives None.
    """
    if not reason:
        return None
    try:
        obj = json.loads(reason)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    ms = obj.get("reconnect_after_ms")
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 <= ms < float("inf"):
        return None
    return ms / 1000.0


def decide_close(code: int | None, reason: str | None = None) -> Decision:
    """Apply PROTOCOL.md's close-code table.

    ``code`` is None for an attempt that failed before the WebSocket opened (connection
    refused, timeout): reconnect with backoff.
    """
    if code in NO_RECONNECT_CODES:
        return Decision(Action.STOP)
    if code == CLOSE_TOKEN_EXPIRED:
        return Decision(Action.REFRESH_TOKEN)
    if code == CLOSE_GOING_AWAY:
        return Decision(Action.RECONNECT, hint=parse_reconnect_hint(reason))
    # 1011, 4002, 1006, 1009, 1002, unknown codes: reconnect (and recover) with backoff.
    return Decision(Action.RECONNECT, longer=code in LONGER_BACKOFF_CODES)


def parse_retry_after(value: str | None) -> float | None:
    """Return the seconds of an HTTP ``Retry-After: N`` header (the date form gives None)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(int(value.strip()))


def decide_rejection(status: int, retry_after: str | None = None) -> Decision:
    """Decide after the server refused the WebSocket handshake with HTTP ``status``.

    401 asks for a new token; 408, 429 and 5xx (503 while a node drains or is full) are
    worth retrying, after ``Retry-After`` when the server sent one; any other 4xx (404
    wrong path, 400 unsupported subprotocol, 403 forbidden origin) will be refused again,
    so the client stops.
    """
    if status == 401:
        return Decision(Action.REFRESH_TOKEN)
    if status == 429:
        return Decision(Action.RECONNECT, hint=parse_retry_after(retry_after), longer=True)
    if status == 408 or status >= 500:
        return Decision(Action.RECONNECT, hint=parse_retry_after(retry_after))
    return Decision(Action.STOP)


class Cursor:
    """One subscription's place in its channel, and the rules for recovery and duplicates.

    ``epoch`` is the epoch of the current subscription; ``offset`` the offset of the last
    message handed to the subscription's buffer (None before the first one). Offsets only
    grow within an epoch, so a message at or below ``offset`` is a duplicate.
    """

    __slots__ = ("channel", "epoch", "offset", "_base")

    def __init__(self, channel: str, since: Position | None = None) -> None:
        self.channel = channel
        self.epoch: str | None = since.epoch if since is not None else None
        self.offset: int | None = since.offset if since is not None else None
        #: The channel's offset in the last ``subscribed``: where a subscription that has
        #: received nothing yet resumes from.
        self._base: int | None = None

    def save(self) -> tuple[str | None, int | None, int | None]:
        """Return the cursor's state, for :meth:`restore`."""
        return self.epoch, self.offset, self._base

    def restore(self, state: tuple[str | None, int | None, int | None]) -> None:
        """Go back to a state from :meth:`save` (a message taken in was not delivered)."""
        self.epoch, self.offset, self._base = state

    def since(self) -> Position | None:
        """Return what to send as ``since`` when (re)subscribing, or None for "from now"."""
        if self.epoch is None:
            return None
        offset = self.offset if self.offset is not None else self._base
        return None if offset is None else Position(self.epoch, offset)

    def on_subscribed(self, asked: Position | None, epoch: str, offset: int,
                      recovered: bool) -> RecoveryLost | None:
        """Take in a ``subscribed`` answer to a subscribe that sent ``since=asked``.

        Returns the loss to report when ``asked`` could not be recovered, else None.
        """
        lost = None
        if asked is not None and not recovered:
            lost = RecoveryLost(self.channel, asked.epoch, asked.offset, epoch, offset)
        if asked is None or epoch != asked.epoch:
            # A new stream: the old offsets mean nothing in this epoch.
            self.epoch, self.offset = epoch, None
        self._base = offset
        return lost

    def on_message(self, offset: int, epoch: str | None = None) -> tuple[bool, RecoveryLost | None]:
        """Take in a ``message`` (or ``poke``) at ``offset``.

        ``epoch`` is the message's own epoch field (sent when the channel's epoch changed
        during the subscription). Returns ``(deliver, lost)``: whether to hand the message
        to the application (False for a duplicate), and a loss to report first when the
        epoch changed under the subscription.
        """
        if epoch is not None and self.epoch is not None and epoch != self.epoch:
            last = self.offset if self.offset is not None else (self._base or 0)
            lost = RecoveryLost(self.channel, self.epoch, last, epoch, offset - 1)
            self.epoch, self.offset = epoch, offset
            return True, lost
        if epoch is not None and self.epoch is None:
            self.epoch = epoch
        if self.offset is not None and offset <= self.offset:
            return False, None
        self.offset = offset
        return True, None

    def on_gap(self, first: int, last: int) -> MessagesSkipped | None:
        """Take in a ``gap``; return the loss to report (None when nothing new was skipped)."""
        if self.offset is not None and last <= self.offset:
            return None
        self.offset = last  # never recover the range later: the application was told
        return MessagesSkipped(self.channel, first, last, self.epoch)
