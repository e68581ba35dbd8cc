"""What a client holds, and the rules for settling its requests and ending it.

:class:`_ClientBase` keeps the options, the state, the subscriptions, the request queue
(publishes wait there while disconnected), the requests waiting for answers and the event
listeners. The connection manager (``_manager``) and the public API (``_client``) build on
it.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Union
from urllib.parse import parse_qs, urlsplit

import trio

from ..core.codec import JSON, MSGPACK, Codec
from ._errors import ClientClosed, MessagesLost, OfflineQueueFull, RequestTimeout
from ._requests import _Kind, _Request, _Stage
from ._subscription import _STOPPED, EventStream, OnRecoveryLost, Subscription
from ._transport import _Connection
from ._types import ClientState, Closed, Event, Lost

log = logging.getLogger("relay.client")

DEFAULT_URL = "ws://127.0.0.1:8765/ws"
TokenCallback = Callable[[], Union[str, Awaitable[str]]]


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """A snapshot of the client (``Client.statistics()``)."""

    state: ClientState
    #: Publishes waiting to be sent (while disconnected: the offline queue).
    queued_publishes: int
    #: Requests sent and waiting for their answer.
    pending_requests: int
    subscriptions: int
    #: Connections that reached ``welcome`` so far.
    connections: int



class _ClientBase:
    """The client's state and bookkeeping (see :class:`relay.client.Client`)."""

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None,
                 encoding: Literal["json", "msgpack"] = "json", min_backoff: float = 0.1,
                 max_backoff: float = 30.0, backoff_factor: float = 2.0,
                 max_offline_queue: int = 1000, token_callback: TokenCallback | None = None,
                 on_recovery_lost: OnRecoveryLost = "raise", request_timeout: float = 10.0,
                 connect_timeout: float = 10.0, ping_timeout: float = 10.0,
                 buffer_size: int = 1000, on_event: Callable[[Event], None] | None = None,
                 tick_ms: int | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"url must be ws://HOST[:PORT]/PATH or wss://..., got {url!r}")
        if encoding not in ("json", "msgpack"):
            raise ValueError(f"encoding must be 'json' or 'msgpack', got {encoding!r}")
        if on_recovery_lost not in ("raise", "event"):
            raise ValueError(f"on_recovery_lost must be 'raise' or 'event', got {on_recovery_lost!r}")
        if not 0 <= min_backoff <= max_backoff < math.inf:
            raise ValueError(f"need 0 <= min_backoff <= max_backoff, got min_backoff={min_backoff}, "
                             f"max_backoff={max_backoff}")
        if not backoff_factor >= 1:
            raise ValueError(f"backoff_factor must be >= 1, got {backoff_factor}")
        for name, value in (("request_timeout", request_timeout), ("connect_timeout", connect_timeout),
                            ("ping_timeout", ping_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if max_offline_queue < 0:
            raise ValueError(f"max_offline_queue must be >= 0, got {max_offline_queue}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        query = parts.query
        if tick_ms is not None:
            if isinstance(tick_ms, bool) or not isinstance(tick_ms, int) or tick_ms <= 0:
                raise ValueError(f"tick_ms must be a positive int (milliseconds) or None, got {tick_ms!r}")
            if "tick_ms" in parse_qs(query, keep_blank_values=True):
                raise ValueError(f"tick_ms is given twice: as an argument and in the url {url!r}")
            query = f"{query}&tick_ms={tick_ms}" if query else f"tick_ms={tick_ms}"
        self.url = url
        #: Milliseconds between the server's deliveries to this client (``?tick_ms=N``), or
        #: None: each message as it comes.
        self.tick_ms = tick_ms
        self.encoding = encoding
        self._tls = parts.scheme == "wss"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._host_header = parts.netloc.rpartition("@")[2]
        self._resource = (parts.path or "/") + (f"?{query}" if query else "")
        #: The server's session id and node of the current (or last) connection.
        self.session: str | None = None
        self.node: str | None = None
        self._token = token
        self._token_callback = token_callback
        self._codec: Codec = MSGPACK if encoding == "msgpack" else JSON
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._backoff_factor = backoff_factor
        self._max_offline_queue = max_offline_queue
        self._on_recovery_lost: OnRecoveryLost = on_recovery_lost
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._ping_timeout = ping_timeout
        self._buffer_size = buffer_size
        self._on_event = on_event

        self._state = ClientState.CONNECTING
        self._state_lot = trio.lowlevel.ParkingLot()
        self._closing = False
        self._closed_error: ClientClosed | None = None
        self._manager_scope = trio.CancelScope()
        self._conn: _Connection | None = None
        self._connections = 0
        self._subs: dict[str, Subscription] = {}
        #: Requests for the writer, in order: publishes (kept while disconnected) and,
        #: while connected, subscribe/unsubscribe requests.
        self._queue: deque[_Request] = deque()
        self._queued_publishes = 0
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._room_lot = trio.lowlevel.ParkingLot()
        self._pending: dict[int, _Request] = {}
        self._refs = itertools.count(1)
        self._listeners: set[EventStream] = set()

    @property
    def state(self) -> ClientState:
        return self._state

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(self._state, self._queued_publishes, len(self._pending),
                                len(self._subs), self._connections)

    # -- requests ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state is ClientState.CLOSED:
            raise self._closed_exception()

    def _closed_exception(self) -> ClientClosed:
        err = self._closed_error
        if err is None:
            return ClientClosed("the client is closed")
        return ClientClosed(str(err), code=err.code, reason=err.reason, http_status=err.http_status)

    def _queue_limit(self) -> int:
        if self._state is ClientState.CONNECTED:
            return max(1, self._max_offline_queue)
        return self._max_offline_queue

    def _queue_full(self) -> OfflineQueueFull:
        limit = self._max_offline_queue
        return OfflineQueueFull(
            f"offline queue is full: {self._queued_publishes:,} publishes wait for the connection "
            f"(max_offline_queue={limit:,}); this publish was not queued", limit=limit)

    def _enqueue(self, request: _Request) -> None:
        self._queue.append(request)
        if request.kind is _Kind.PUBLISH:
            self._queued_publishes += 1
        self._writer_lot.unpark_all()

    def _dequeue(self, request: _Request) -> None:
        try:
            self._queue.remove(request)
        except ValueError:  # already taken or purged
            return
        if request.kind is _Kind.PUBLISH:
            self._queued_publishes -= 1
            self._room_lot.unpark_all()
        request.set_stage(_Stage.DONE)

    async def _wait(self, request: _Request) -> Any:
        """Wait for ``request``'s answer: no time limit while queued, request_timeout once sent."""
        try:
            while request.stage is _Stage.QUEUED or request.stage is _Stage.SENDING:
                await request.wait_changed()
            if request.sent():
                with trio.move_on_after(self._request_timeout):
                    while request.sent():
                        await request.wait_changed()
                if request.sent():
                    raise RequestTimeout(
                        f"no answer to {request.kind.value} on {request.channel!r} within "
                        f"request_timeout={self._request_timeout}s of sending it"
                        + ("; it may or may not have been published" if request.kind is _Kind.PUBLISH else ""))
        finally:
            if request.stage is _Stage.QUEUED:
                self._dequeue(request)  # cancelled before it was sent: it never will be
            elif request.sent() and request.ref is not None:
                self._pending.pop(request.ref, None)  # a late answer is ignored
        if request.error is not None:
            raise request.error
        return request.result

    def _drop(self, sub: Subscription, end: Exception) -> None:
        """Forget ``sub`` locally; if the server has it on the open connection, unsubscribe."""
        if self._subs.get(sub.channel) is sub:
            del self._subs[sub.channel]
        sub._finish(end, discard=True)
        if sub._conn is not None and sub._conn is self._conn:
            self._enqueue(_Request(_Kind.UNSUBSCRIBE, sub.channel, target=sub._conn))
        sub._conn = None

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.get(sub.channel) is not sub:
            sub._finish(_STOPPED, discard=True)
            return
        conn = sub._conn
        del self._subs[sub.channel]
        sub._finish(_STOPPED, discard=True)
        sub._conn = None
        if conn is None or conn is not self._conn:
            return
        request = _Request(_Kind.UNSUBSCRIBE, sub.channel, target=conn)
        self._enqueue(request)
        await self._wait(request)

    # -- events and state -------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        log.debug("event %s", event)
        if self._on_event is not None:
            self._on_event(event)
        for listener in list(self._listeners):
            listener._push(event)

    def _set_state(self, state: ClientState) -> None:
        self._state = state
        self._state_lot.unpark_all()
        self._room_lot.unpark_all()

    def _report_lost(self, sub: Subscription, error: MessagesLost) -> None:
        log.info("%s", error)
        self._emit(Lost(error))
        if sub.on_recovery_lost == "raise":
            sub._put_lost(error)

    def _finish(self, error: ClientClosed | None) -> None:
        """Stop for good: fail what waits, end subscriptions and listeners."""
        if self._state is ClientState.CLOSED:
            return
        self._closed_error = error
        self._set_state(ClientState.CLOSED)
        for request in self._queue:
            request.fail(self._closed_exception())
        self._queue.clear()
        self._queued_publishes = 0
        for request in self._pending.values():
            request.fail(self._closed_exception())
        self._pending.clear()
        for sub in self._subs.values():
            sub._finish(self._closed_exception() if error is not None else _STOPPED,
                        discard=error is None)
        self._subs.clear()
        self._writer_lot.unpark_all()
        self._emit(Closed(error))
        self._listeners.clear()

