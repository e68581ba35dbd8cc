"""The Python client's API: :func:`connect` and :class:`Client`.

:func:`connect` opens a nursery and runs the client's connection manager in it
(``_manager``); :class:`Client` is what the application calls: subscribe, publish, refresh,
events, state. The bookkeeping lives in ``_base``, the protocol decisions in ``_policy``.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal, NoReturn

import trio

from ..core.codec import check_json_compatible
from ..errors import BadRequest
from ._base import DEFAULT_URL, TokenCallback
from ._errors import AlreadySubscribed, InvalidData, RequestFailed
from ._manager import CLOSE_NORMAL, CLOSE_TIMEOUT_SECONDS, _ConnectionManager
from ._requests import PendingPublish, _Kind, _Request
from ._subscription import (
    EventStream,
    OnRecoveryLost,
    Since,
    Subscription,
    _as_position,
)
from ._types import Ack, ClientState, Event, Member, PresenceStats

if sys.version_info < (3, 11):  # pragma: no cover - trio depends on the backport there
    from exceptiongroup import BaseExceptionGroup


class Client(_ConnectionManager):
    """A connection to relay that reconnects and recovers by itself; made by :func:`connect`.

    See :func:`connect` for the options and docs/clients.md for the behaviour.
    """

    def __repr__(self) -> str:
        return f"<relay.client.Client {self.url} {self._state.value}>"

    def events(self, buffer: int = 256) -> EventStream:
        """Return an async iterator over the events from now on, ending after :class:`Closed`.

        Call it before the ``async with`` body first awaits to see the first
        :class:`Connecting` too (or pass ``on_event`` to :func:`connect`).

        Args:
            buffer: events this listener may fall behind before it raises EventsOverflow.
        """
        if buffer < 1:
            raise ValueError(f"buffer must be >= 1, got {buffer}")
        stream = EventStream(self, buffer)
        if self._state is ClientState.CLOSED:
            stream._ended = True
        else:
            self._listeners.add(stream)
        return stream

    async def wait_connected(self) -> None:
        """Wait until the client is connected (it may be already).

        Raises:
            ClientClosed: the client stopped for good.
        """
        while self._state is not ClientState.CONNECTED:
            self._check_open()
            await self._state_lot.park()

    async def subscribe(self, channel: str, since: Since = None, *,
                        on_recovery_lost: OnRecoveryLost | None = None,
                        buffer_size: int | None = None) -> Subscription:
        """Subscribe to ``channel`` and return its :class:`Subscription`.

        When connected, waits for the server's ``subscribed`` (so a refused channel raises
        here); while disconnected, returns at once and subscribes when the connection
        opens (a refusal is then raised by the iterator). The subscription outlives
        reconnections: the client resubscribes with ``since`` set to the last message it
        received.

        Args:
            channel: the channel name.
            since: resume after this position (``Position``, ``(epoch, offset)`` or
                ``"EPOCH:OFFSET"``); when it cannot be recovered the subscription reports
                a :class:`RecoveryLost` first.
            on_recovery_lost: ``"raise"`` or ``"event"`` for this subscription (default:
                the client's setting).
            buffer_size: messages buffered for the application (default: the client's).

        Raises:
            AlreadySubscribed: this client is already subscribed to ``channel``.
            RequestFailed: the server refused (``bad_request`` for an invalid name, ...).
            RequestTimeout: no answer within ``request_timeout``.
            ClientClosed: the client is closed.

        If cancelled while waiting for the answer, the subscription is abandoned.
        """
        self._check_open()
        if not isinstance(channel, str):
            raise TypeError(f"channel must be a str, got {type(channel).__name__}")
        if channel in self._subs:
            raise AlreadySubscribed(f"already subscribed to {channel!r}; use its Subscription")
        mode = on_recovery_lost if on_recovery_lost is not None else self._on_recovery_lost
        if mode not in ("raise", "event"):
            raise ValueError(f"on_recovery_lost must be 'raise' or 'event', got {mode!r}")
        size = buffer_size if buffer_size is not None else self._buffer_size
        if size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {size}")
        sub = Subscription(self, channel, _as_position(since), mode, size)
        self._subs[channel] = sub
        if self._conn is None:
            return sub
        request = _Request(_Kind.SUBSCRIBE, channel, sub=sub)
        self._enqueue(request)
        confirmed = False
        try:
            await self._wait(request)
            confirmed = True
        finally:
            if not confirmed:
                self._drop(sub, RequestFailed("abandoned", "subscribe did not complete", channel=channel))
        return sub

    def publish_nowait(self, channel: str, data: Any) -> PendingPublish:
        """Queue a publish without waiting; publishes go out in the order they were made.

        Raises:
            OfflineQueueFull: ``max_offline_queue`` publishes already wait (while connected:
                the connection is that far behind).
            InvalidData: ``data`` is not JSON-compatible.
            ClientClosed: the client is closed.
        """
        request = self._new_publish(channel, data)
        if self._queued_publishes >= self._queue_limit():
            raise self._queue_full()
        self._enqueue(request)
        return PendingPublish(self, request)

    async def publish(self, channel: str, data: Any) -> Ack:
        """Publish ``data`` to ``channel`` and return the server's :class:`Ack`.

        While disconnected the publish waits in the offline queue and goes out, in order,
        after reconnecting; the ``request_timeout`` starts when it is sent. Cancelling it
        while it is still queued withdraws it (it is never sent).

        Raises:
            OfflineQueueFull: disconnected, and ``max_offline_queue`` publishes already wait.
                (While connected, a full queue makes ``publish`` wait for room instead.)
            InvalidData: ``data`` is not JSON-compatible (bytes, NaN, non-string keys, ...).
            RequestFailed: the server refused it (``forbidden``, ``bad_request``, ...).
            RequestTimeout: no ack within ``request_timeout`` of sending: unknown outcome.
            PublishUnconfirmed: the connection ended after sending, before the ack: unknown
                outcome (not resent, so never duplicated).
            ClientClosed: the client is closed, or closed before the publish was sent.
        """
        request = self._new_publish(channel, data)
        while self._queued_publishes >= self._queue_limit():
            if self._state is not ClientState.CONNECTED:
                raise self._queue_full()
            await self._room_lot.park()
            self._check_open()
        self._enqueue(request)
        ack: Ack = await self._wait(request)
        return ack

    async def refresh(self, token: str) -> float | None:
        """Replace the token: on the open connection (``refresh``) and for every reconnection.

        Returns the new expiry (unix seconds) the server accepted, or None when not
        connected (the token is then simply used by the next connection).

        Raises:
            RequestFailed: the server refused it (``unauthorized``: invalid, or for another
                user); the old token stays in force.
            RequestTimeout: no answer within ``request_timeout``.
            ClientClosed: the client is closed.
        """
        self._check_open()
        if not isinstance(token, str) or not token:
            raise ValueError("token must be a non-empty str")
        if self._conn is None:
            self._token = token
            return None
        request = _Request(_Kind.REFRESH, "", token)
        self._enqueue(request)
        expires: float | None = await self._wait(request)
        if expires is not None or self._conn is None:
            self._token = token
        return expires

    async def presence(self, channel: str) -> list[Member]:
        """Return the members of ``channel`` (its subscribers, on every node), oldest first.

        The channel needs ``presence = true`` on the server, and the token must allow
        subscribing to it; the client itself need not be subscribed. While disconnected
        the request waits for the connection. Cancelling it withdraws it (or ignores the
        answer once sent).

        Raises:
            RequestFailed: the server refused it (``bad_request``: presence is not enabled
                for the channel; ``forbidden``; ``unavailable``: Redis is down, or the
                connection ended before the answer).
            RequestTimeout: no answer within ``request_timeout`` of sending it.
            ClientClosed: the client is closed.
        """
        members: list[Member] = await self._query(_Kind.PRESENCE, channel)
        return members

    async def presence_stats(self, channel: str) -> PresenceStats:
        """Return how many connections and distinct users are in ``channel`` (cheaper than
        :meth:`presence` for big channels); raises as :meth:`presence` does."""
        stats: PresenceStats = await self._query(_Kind.PRESENCE_STATS, channel)
        return stats

    async def _query(self, kind: _Kind, channel: str) -> Any:
        self._check_open()
        if not isinstance(channel, str):
            raise TypeError(f"channel must be a str, got {type(channel).__name__}")
        request = _Request(kind, channel)
        self._enqueue(request)
        return await self._wait(request)

    async def aclose(self) -> None:
        """Close the connection (1000) and stop; idempotent. Done by :func:`connect` on exit.

        Queued publishes fail with ClientClosed; subscriptions stop. Shielded from
        cancellation for at most ``CLOSE_TIMEOUT_SECONDS``.
        """
        if self._state is not ClientState.CLOSED:
            self._closing = True
            conn = self._conn
            if conn is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_SECONDS):
                    await conn.ws.aclose(CLOSE_NORMAL, "client closed")
            self._finish(None)
        self._manager_scope.cancel()

    def _new_publish(self, channel: str, data: Any) -> _Request:
        self._check_open()
        if not isinstance(channel, str):
            raise TypeError(f"channel must be a str, got {type(channel).__name__}")
        try:
            check_json_compatible(data)
        except BadRequest as exc:
            raise InvalidData(f"cannot publish to {channel!r}: {exc}") from None
        return _Request(_Kind.PUBLISH, channel, data)



@asynccontextmanager
async def connect(url: str = DEFAULT_URL, *, token: str | None = None,
                  encoding: Literal["json", "msgpack"] = "json", min_backoff: float = 0.1,
                  max_backoff: float = 30.0, backoff_factor: float = 2.0,
                  max_offline_queue: int = 1000, token_callback: TokenCallback | None = None,
                  on_recovery_lost: OnRecoveryLost = "raise", request_timeout: float = 10.0,
                  connect_timeout: float = 10.0, ping_timeout: float = 10.0,
                  buffer_size: int = 1000,
                  on_event: Callable[[Event], None] | None = None,
                  tick_ms: int | None = None) -> AsyncIterator[Client]:
    """Connect to a relay server and keep connected until the block exits.

    Yields the :class:`Client` at once; it connects in the background (``wait_connected``
    waits for it). On exit it closes the connection with 1000. The client reconnects after
    every close except 1000 and 1008 (see docs/clients.md).

    Args:
        url: the server's WebSocket URL.
        token: a JWT, sent as ``Authorization: Bearer`` on every connection.
        encoding: ``"json"`` (text frames) or ``"msgpack"`` (binary frames).
        min_backoff, max_backoff, backoff_factor: reconnection attempt n waits a random
            time in ``[0, min(max_backoff, min_backoff * backoff_factor ** (n - 1))]``
            (longer after 1013 and 4003; the server's hint after 1001).
        max_offline_queue: publishes that may wait while disconnected; beyond, publish
            raises OfflineQueueFull.
        token_callback: called (sync or async) for a new token after close 4001 or an
            HTTP 401 handshake, before reconnecting. Without it those end the client.
        on_recovery_lost: ``"raise"`` (default): a subscription's iterator raises
            RecoveryLost / MessagesSkipped where messages were lost; ``"event"``: only a
            :class:`Lost` event is emitted and iteration goes on.
        request_timeout: seconds to wait for an answer once a request is sent.
        connect_timeout: seconds for TCP, the WebSocket handshake and ``welcome``.
        ping_timeout: seconds to wait for a pong before treating the connection as dead.
        buffer_size: messages a subscription buffers before the connection waits for the
            application to read (backpressure).
        on_event: called synchronously with every :data:`Event`.
        tick_ms: ask the server to deliver once every ``tick_ms`` milliseconds (``?tick_ms=N``
            on the URL; the server accepts 10 to 1000): messages then come in batches, one
            WebSocket frame per tick, which the client unpacks, so the application sees the
            same messages in the same order (a ``state`` channel keeps only its newest value
            per tick). Fewer frames for the client to read, at up to one tick of latency.

    Raises:
        ValueError: an invalid option.
    """
    client = Client(url, token=token, encoding=encoding, min_backoff=min_backoff,
                    max_backoff=max_backoff, backoff_factor=backoff_factor,
                    max_offline_queue=max_offline_queue, token_callback=token_callback,
                    on_recovery_lost=on_recovery_lost, request_timeout=request_timeout,
                    connect_timeout=connect_timeout, ping_timeout=ping_timeout,
                    buffer_size=buffer_size, on_event=on_event, tick_ms=tick_ms)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._run)
            try:
                yield client
            except BaseException as exc:  # noted, not handled: re-raised at once
                body_error = exc
                raise
            finally:
                await client.aclose()
    except BaseExceptionGroup as group:
        # The nursery wraps what the ``async with`` body raised; give it back unwrapped so
        # ``except ClientClosed:`` around the block works. (The manager task only raises on
        # a bug, and then the group stays as it is.)
        if body_error is None or list(group.exceptions) != [body_error]:
            raise
        _reraise(body_error)


def _reraise(exc: BaseException) -> NoReturn:
    """Raise ``exc`` again, keeping its own cause and context (not the group's)."""
    cause, context, suppress = exc.__cause__, exc.__context__, exc.__suppress_context__
    try:
        raise exc
    finally:
        exc.__cause__, exc.__context__, exc.__suppress_context__ = cause, context, suppress
        del exc
