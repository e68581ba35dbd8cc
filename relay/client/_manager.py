"""The connection's life: connect, serve, end, and reconnect or stop per the close-code policy.

:class:`_ConnectionManager` runs one task for the client (``_run``). While a connection is
open it runs three tasks in that connection's nursery: the reader (decodes, matches answers
to requests by ``ref``, hands messages to subscriptions, waiting when one is full), the
writer (the only task that sends: the request queue, resubscriptions first) and the
keepalive (WebSocket pings). When the connection ends it settles what was in flight and
asks :mod:`._policy` what the close means.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from ..core import mergepatch
from ..core.codec import JSON, dumps_json, loads_json
from ..errors import BadRequest
from ._base import _ClientBase
from ._errors import (
    ClientClosed,
    ClientError,
    PublishUnconfirmed,
    RequestFailed,
    SubscriptionEnded,
)
from ._policy import (
    LONGER_BACKOFF_STEPS,
    STABLE_CONNECTION_SECONDS,
    Action,
    Decision,
    backoff_delay,
    decide_close,
    decide_rejection,
)
from ._requests import _Kind, _Request, _Stage
from ._subscription import Subscription
from ._transport import (
    MAX_INCOMING_MESSAGE_BYTES,
    WS_MESSAGE_QUEUE,
    _Connection,
    _describe_connect_error,
    _HangupWatch,
    _only,
    _ProtocolError,
)
from ._types import (
    Ack,
    ClientState,
    Connected,
    Connecting,
    Disconnected,
    Join,
    Leave,
    Member,
    Message,
    Poke,
    PresenceStats,
    Reconnecting,
    Subscribed,
)

if sys.version_info < (3, 11):  # pragma: no cover - trio depends on the backport there
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger("relay.client")

#: How long a goodbye close handshake may take.
CLOSE_TIMEOUT_SECONDS = 1.0
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_ABNORMAL = 1006
#: The jitter source (tests replace it to make delays exact).
_rand: Callable[[], float] = random.random


def _is_array(raw: str | bytes) -> bool:
    """Whether a frame holds an array (a tick's batch) rather than one message (a map)."""
    if isinstance(raw, str):
        return raw[:1] == "["
    return bool(raw) and (0x90 <= raw[0] <= 0x9F or raw[0] in (0xDC, 0xDD))


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not supported")


@dataclass(frozen=True, slots=True)
class _Ended:
    code: int | None
    reason: str
    decision: Decision
    http_status: int | None = None
    stable: bool = False



def _field(msg: dict[str, Any], name: str, kind: type) -> Any:
    value = msg.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _ProtocolError(f"{msg.get('type')!r} message has a bad {name!r}: {value!r}")
    return value


#: Requests that only ask (presence): kept queued across a reconnection, failed when the
#: connection ends after they were sent.
_QUERIES = (_Kind.PRESENCE, _Kind.PRESENCE_STATS)


def _member(raw: Any) -> Member:
    """Turn a member of the wire into a :class:`Member`."""
    if not isinstance(raw, dict):
        raise _ProtocolError(f"a presence member must be an object, got {raw!r}")
    joined = raw.get("joined")
    if isinstance(joined, bool) or not isinstance(joined, (int, float)):
        raise _ProtocolError(f"a presence member has a bad 'joined': {joined!r}")
    return Member(str(raw.get("user") or ""), str(raw.get("conn") or ""), float(joined), raw.get("info"))



class _ConnectionManager(_ClientBase):
    """Connects, serves and reconnects (see the module docstring)."""

    async def _run(self) -> None:
        """Connect, serve, and reconnect per the close-code policy until closed."""
        attempt = 0
        with self._manager_scope:
            try:
                while True:
                    self._set_state(ClientState.CONNECTING)
                    self._emit(Connecting(attempt, self.url))
                    ended = await self._connect_once()
                    if self._closing:
                        return
                    self._emit(Disconnected(ended.code, ended.reason, ended.http_status))
                    if ended.stable:
                        attempt = 0
                    decision = ended.decision
                    if decision.action is Action.STOP:
                        self._finish(self._stop_error(ended))
                        return
                    if decision.action is Action.REFRESH_TOKEN and not await self._refresh_token(ended):
                        return
                    attempt += 1
                    if decision.hint is not None:  # the server's hint, plus a little jitter
                        delay = decision.hint + _rand() * self._min_backoff
                    else:
                        steps = LONGER_BACKOFF_STEPS if decision.longer else 0
                        delay = backoff_delay(attempt + steps, min_backoff=self._min_backoff,
                                              max_backoff=self._max_backoff,
                                              factor=self._backoff_factor, rand=_rand)
                    self._set_state(ClientState.RECONNECTING)
                    self._emit(Reconnecting(attempt, delay))
                    await trio.sleep(delay)
            except Exception:
                log.exception("relay.client connection manager crashed")
                raise

    def _stop_error(self, ended: _Ended) -> ClientClosed:
        if ended.http_status is not None:
            text = f"the server refused the WebSocket handshake with {ended.reason}"
        elif ended.code == 1000:
            text = f"the server closed the connection normally (1000 {ended.reason!r}); not reconnecting"
        elif ended.code == 1008:
            text = f"the server closed the connection for a policy violation (1008 {ended.reason!r}); not reconnecting"
        elif ended.code is None:
            text = f"{ended.reason}; not reconnecting"
        else:
            text = f"connection ended ({ended.code} {ended.reason!r}); not reconnecting"
        return ClientClosed(text, code=ended.code, reason=ended.reason, http_status=ended.http_status)

    async def _refresh_token(self, ended: _Ended) -> bool:
        """Get a new token from token_callback; on failure, stop and return False."""
        what = "HTTP 401" if ended.http_status == 401 else f"close {ended.code}"
        callback = self._token_callback
        if callback is None:
            self._finish(ClientClosed(
                f"the server asked for a new token ({what} {ended.reason!r}) and no "
                f"token_callback was given", code=ended.code, reason=ended.reason,
                http_status=ended.http_status))
            return False
        try:
            token = callback()
            if inspect.isawaitable(token):
                token = await token
            if not isinstance(token, str) or not token:
                raise TypeError(f"token_callback must return a non-empty str, got {token!r}")
        except Exception as exc:  # the application's callback: its failure ends the client
            error = ClientClosed(f"token_callback failed after {what}: {exc!r}", code=ended.code,
                                 reason=ended.reason, http_status=ended.http_status)
            error.__cause__ = exc
            self._finish(error)
            return False
        self._token = token
        return True

    async def _connect_once(self) -> _Ended:
        """Make one connection attempt and serve the connection until it ends."""
        deadline = trio.current_time() + self._connect_timeout
        try:
            with trio.fail_at(deadline):
                stream = await self._open_stream()
        except trio.TooSlowError:
            return _Ended(None, f"cannot connect: no TCP connection within "
                          f"connect_timeout={self._connect_timeout}s", decide_close(None))
        except (OSError, trio.BrokenResourceError) as exc:
            return _Ended(None, f"cannot connect: {_describe_connect_error(exc)}", decide_close(None))
        conn: _Connection | None = None
        failed: str | None = None
        try:
            async with trio.open_nursery() as nursery:  # trio-websocket's reader task runs here
                opened = await self._handshake(nursery, stream, deadline)
                if isinstance(opened, str):
                    failed = opened
                    nursery.cancel_scope.cancel()
                else:
                    conn = _Connection(opened)
                    try:
                        await self._serve(conn, deadline)
                    finally:
                        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_SECONDS):
                            await opened.aclose()  # (a no-op when the connection is closed already)
                        nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The server refused the upgrade: trio-websocket raises that in its reader task.
            rejected = _only(group, ConnectionRejected)
            if rejected is None:
                raise
            body = (rejected.body or b"").decode("utf-8", "replace").strip()
            retry_after = next((v.decode("latin-1") for k, v in rejected.headers
                                if k.lower() == b"retry-after"), None)
            return _Ended(None, f"HTTP {rejected.status_code}" + (f": {body}" if body else ""),
                          decide_rejection(rejected.status_code, retry_after),
                          http_status=rejected.status_code)
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            if conn is not None:
                self._on_disconnect(conn)
        if failed is not None:
            return _Ended(None, failed, decide_close(None))
        assert conn is not None
        stable = conn.opened_at is not None and (
            trio.current_time() - conn.opened_at >= STABLE_CONNECTION_SECONDS)
        decision = conn.decision or decide_close(conn.code, conn.reason)
        code = conn.code if conn.code is not None or conn.opened_at is None else CLOSE_ABNORMAL
        return _Ended(code, conn.reason, decision, stable=stable)

    async def _open_stream(self) -> trio.abc.Stream:
        host, port = self._host, self._port
        if self._tls:
            return await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=ssl.create_default_context(), https_compatible=True)
        return await trio.open_tcp_stream(host, port)

    async def _handshake(self, nursery: trio.Nursery, stream: trio.abc.Stream,
                         deadline: float) -> WebSocketConnection | str:
        """Upgrade ``stream`` to a WebSocket; return it, or why that failed.

        A refusal (HTTP 4xx/5xx) is raised by trio-websocket's reader task into
        ``nursery`` as ConnectionRejected.
        """
        headers = [(b"authorization", b"Bearer " + self._token.encode())] if self._token else None
        watched = _HangupWatch(stream)
        with trio.move_on_at(deadline) as timer:
            with trio.CancelScope() as hangup:
                # trio-websocket waits for the server's answer only; a server that hangs up
                # instead (a proxy with no backend) would otherwise cost the whole timeout.
                watched.on_eof = hangup.cancel
                ws = await wrap_client_stream(  # (it only needs a trio Stream)
                    nursery, watched, self._host_header, self._resource,  # type: ignore[arg-type]
                    subprotocols=[self._codec.subprotocol], extra_headers=headers,
                    message_queue_size=WS_MESSAGE_QUEUE, max_message_size=MAX_INCOMING_MESSAGE_BYTES)
                watched.on_eof = None
                return ws
        if timer.cancelled_caught:
            return f"no WebSocket handshake within connect_timeout={self._connect_timeout}s"
        assert hangup.cancelled_caught
        return "the server closed the connection during the WebSocket handshake"

    async def _serve(self, conn: _Connection, deadline: float) -> None:
        ws = conn.ws
        chosen = ws.subprotocol
        if chosen != self._codec.subprotocol and not (chosen is None and self._codec is JSON):
            conn.end(None, f"the server chose subprotocol {chosen!r}; this client asked for "
                     f"{self._codec.subprotocol!r}", decision=Decision(Action.STOP))
            return
        welcome: dict[str, Any] | None = None
        try:
            with trio.move_on_at(deadline):
                welcome = self._decode(await ws.get_message())
        except ConnectionClosed as exc:
            self._closed_by_peer(conn, exc)
            return
        except _ProtocolError as exc:
            conn.end(None, str(exc), send=(CLOSE_PROTOCOL_ERROR, "bad welcome"))
            await self._say_goodbye(conn)
            return
        if welcome is None:
            conn.end(None, f"no welcome within connect_timeout={self._connect_timeout}s")
            return
        if welcome.get("type") != "welcome":
            conn.end(None, f"expected welcome first, got {welcome.get('type')!r}",
                     send=(CLOSE_PROTOCOL_ERROR, "expected welcome"))
            await self._say_goodbye(conn)
            return
        heartbeat = welcome.get("heartbeat")
        if isinstance(heartbeat, (int, float)) and not isinstance(heartbeat, bool) and 0 < heartbeat < math.inf:
            conn.heartbeat = float(heartbeat)
        self.session = str(welcome.get("session", ""))
        self.node = str(welcome.get("node", ""))
        conn.opened_at = trio.current_time()
        self._connections += 1
        # Resubscribe every channel before anything else queued (the offline queue's
        # publishes), in the order the channels were subscribed.
        self._queue.extendleft(reversed([
            _Request(_Kind.SUBSCRIBE, sub.channel, sub=sub) for sub in self._subs.values()]))
        self._conn = conn
        self._set_state(ClientState.CONNECTED)
        self._emit(Connected(self.session, self.node))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reader, conn, nursery.cancel_scope)
            nursery.start_soon(self._writer, conn)
            nursery.start_soon(self._keepalive, conn, nursery.cancel_scope)
        await self._say_goodbye(conn)

    async def _say_goodbye(self, conn: _Connection) -> None:
        if conn.send_close is not None:
            code, reason = conn.send_close
            with trio.move_on_after(CLOSE_TIMEOUT_SECONDS):
                await conn.ws.aclose(code, reason)

    def _closed_by_peer(self, conn: _Connection, exc: ConnectionClosed) -> None:
        reason = exc.reason
        if reason is None:
            conn.end(CLOSE_ABNORMAL, "connection lost")
        else:  # (wsproto gives known codes as an IntEnum: report plain ints)
            conn.end(int(reason.code), reason.reason or "")

    def _on_disconnect(self, conn: _Connection) -> None:
        """The connection is over: settle what was in flight on it."""
        if self._conn is conn:
            self._conn = None
        if self._state is ClientState.CLOSED:
            return
        for ref, request in list(self._pending.items()):
            if request.conn is not conn:
                continue
            del self._pending[ref]
            if request.kind in _QUERIES:
                request.fail(RequestFailed("unavailable", f"the connection ended ({conn.code} "
                                           f"{conn.reason!r}) before the answer to {request.kind.value}",
                                           channel=request.channel))
            elif request.kind is _Kind.PUBLISH:
                request.fail(PublishUnconfirmed(
                    f"the connection ended ({conn.code} {conn.reason!r}) after the publish to "
                    f"{request.channel!r} was sent and before its ack; it may or may not have "
                    f"been published", channel=request.channel, code=conn.code))
            else:
                request.resolve(request.sub)  # subscribe: done again on the next connection
        kept: deque[_Request] = deque()
        for request in self._queue:
            if request.kind is _Kind.PUBLISH or request.kind in _QUERIES:
                kept.append(request)
            else:
                request.resolve(request.sub)
        self._queue = kept
        for sub in self._subs.values():
            if sub._conn is conn:
                sub._conn = None
        self._room_lot.unpark_all()

    # -- connection tasks -------------------------------------------------------------

    def _encode(self, message: dict[str, Any]) -> str | bytes:
        if self._codec is JSON:
            return dumps_json(message).decode()
        return self._codec.encode(message)

    def _decode(self, raw: str | bytes) -> dict[str, Any]:
        try:
            return self._codec.decode(raw)
        except BadRequest as exc:
            raise _ProtocolError(f"undecodable message from the server: {exc}") from None

    def _decode_all(self, raw: str | bytes) -> list[dict[str, Any]]:
        """Return the messages in one frame: one, or the array of a tick (``tick_ms``)."""
        if not _is_array(raw):
            return [self._decode(raw)]
        try:
            if isinstance(raw, str):
                items = loads_json(raw)
            else:
                items = msgpack.unpackb(raw, raw=False, strict_map_key=False, ext_hook=_no_ext)
        except (ValueError, RecursionError, msgpack.UnpackException, msgpack.ExtraData) as exc:
            raise _ProtocolError(f"undecodable batch of messages from the server: {exc}") from None
        if isinstance(items, list) and any(isinstance(m, list) for m in items):
            # A channel's tick (``tick_ms`` in its options) inside a connection's tick.
            items = [m for item in items for m in (item if isinstance(item, list) else [item])]
        if not isinstance(items, list) or not all(isinstance(m, dict) for m in items):
            raise _ProtocolError("a batch of messages from the server holds something else than messages")
        return items

    async def _reader(self, conn: _Connection, scope: trio.CancelScope) -> None:
        try:
            while True:
                try:
                    raw = await conn.ws.get_message()
                except ConnectionClosed as exc:
                    self._closed_by_peer(conn, exc)
                    return
                try:
                    for msg in self._decode_all(raw):
                        await self._dispatch(conn, msg)
                except _ProtocolError as exc:
                    log.warning("closing the connection to %s: %s", self.url, exc)
                    conn.end(CLOSE_PROTOCOL_ERROR, str(exc), send=(CLOSE_PROTOCOL_ERROR, "protocol error"))
                    return
        finally:
            scope.cancel()

    async def _dispatch(self, conn: _Connection, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "message" or kind == "poke":
            channel = _field(msg, "channel", str)
            offset = _field(msg, "offset", int)
            sub = self._subs.get(channel)
            if sub is None or sub._conn is not conn:
                return  # left meanwhile, or not subscribed on this connection
            epoch = msg.get("epoch")
            data = msg.get("data")
            if kind == "message" and msg.get("delta") is True:
                cursor = sub._cursor
                if cursor.offset is not None and offset <= cursor.offset and epoch is None:
                    sub._duplicates += 1
                    return
                base = msg.get("base")
                if epoch is not None or sub._value_at is None or sub._value_at != (cursor.epoch, base):
                    # Not the value this subscription holds (it missed a message): fetch
                    # the full value; never apply a patch to the wrong base.
                    self._resync(conn, sub)
                    return
                data = mergepatch.apply(sub._value, data)
            before = sub._cursor.save()
            deliver, lost = sub._cursor.on_message(offset, epoch if isinstance(epoch, str) else None)
            if lost is not None:
                self._report_lost(sub, lost)
            if not deliver:
                sub._duplicates += 1
                return
            current = sub._cursor.epoch or ""
            received = time.time()
            stamp = msg.get("ts")
            ts = None
            if isinstance(stamp, int) and not isinstance(stamp, bool):
                ts = stamp / 1_000_000
                sub._latencies.append(received - ts)
            item: Message | Poke
            if kind == "message":
                if sub._delta:  # the value is kept: the application gets its own copy
                    item = Message(channel, offset, mergepatch.copy(data), current, ts, received)
                else:
                    item = Message(channel, offset, data, current, ts, received)
            else:
                item = Poke(channel, offset, current, None, ts, received)
            if sub._has_room():
                sub._append(item)
                if sub._delta and kind == "message":
                    sub._value, sub._value_at = data, (sub._cursor.epoch, offset)
                return
            conn.paused = conn.paused_during_ping = True
            buffered = False
            try:
                await sub._put(item)  # backpressure: the application reads too slowly
                buffered = True
            finally:
                conn.paused = False
                if not buffered:
                    # Interrupted before the message reached the buffer: the cursor must not
                    # claim it, so that resubscribing fetches it again.
                    sub._cursor.restore(before)
            if sub._delta and kind == "message":
                sub._value, sub._value_at = data, (sub._cursor.epoch, offset)
        elif kind == "gap":
            channel = _field(msg, "channel", str)
            sub = self._subs.get(channel)
            if sub is not None and sub._conn is conn:
                skipped = sub._cursor.on_gap(_field(msg, "from", int), _field(msg, "to", int))
                if skipped is not None:
                    self._report_lost(sub, skipped)
        elif kind in ("join", "leave", "presence_diff"):
            self._presence_event(conn, msg)
        elif kind in ("ack", "subscribed", "unsubscribed", "refreshed", "error", "pong",
                      "presence", "presence_stats"):
            ref = msg.get("ref")
            request = self._pending.pop(ref, None) if isinstance(ref, int) else None
            if request is not None:
                self._answer(conn, request, msg)
            elif kind == "unsubscribed" and ref is None:
                self._ended_by_server(conn, _field(msg, "channel", str))
            elif kind == "error":
                log.warning("error from the server: %s: %s", msg.get("code"), msg.get("message"))
        # welcome (again), and types a newer server may add: nothing to do.

    def _answer(self, conn: _Connection, request: _Request, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "error":
            error = RequestFailed(str(msg.get("code")), str(msg.get("message")),
                                  channel=request.channel or None)
            if request.kind is _Kind.SUBSCRIBE and request.sub is not None:
                self._refused(request.sub, error)
            request.fail(error)
        elif request.kind is _Kind.PUBLISH and kind == "ack":
            request.resolve(Ack(request.channel, _field(msg, "offset", int), _field(msg, "epoch", str)))
        elif request.kind is _Kind.SUBSCRIBE and kind == "subscribed":
            sub = request.sub
            assert sub is not None
            if sub._end is None and self._subs.get(sub.channel) is sub and sub._conn is conn:
                epoch, offset = _field(msg, "epoch", str), _field(msg, "offset", int)
                recovered = msg.get("recovered") is True
                lost = sub._cursor.on_subscribed(request.since, epoch, offset, recovered)
                sub._delta, sub._resyncing = msg.get("delta") is True, False
                if sub._value_at is not None and sub._value_at[0] != epoch:
                    sub._value_at = None  # a new epoch: the value's offset means nothing
                self._emit(Subscribed(sub.channel, epoch, offset, recovered))
                if lost is not None:
                    self._report_lost(sub, lost)
                sub._mark_subscribed()
            request.resolve(sub)
        elif request.kind is _Kind.UNSUBSCRIBE and kind == "unsubscribed":
            request.resolve(None)
        elif request.kind is _Kind.PRESENCE and kind == "presence":
            members = msg.get("members")
            if not isinstance(members, list):
                raise _ProtocolError(f"'presence' message has bad 'members': {members!r}")
            request.resolve([_member(m) for m in members])
        elif request.kind is _Kind.PRESENCE_STATS and kind == "presence_stats":
            request.resolve(PresenceStats(request.channel, _field(msg, "connections", int),
                                          _field(msg, "users", int)))
        elif request.kind is _Kind.REFRESH and kind == "refreshed":
            expires = msg.get("expires")
            if isinstance(expires, bool) or not isinstance(expires, (int, float)):
                raise _ProtocolError(f"'refreshed' message has a bad 'expires': {expires!r}")
            request.resolve(float(expires))
        else:
            raise _ProtocolError(f"{kind!r} does not answer a {request.kind.value} request")

    def _presence_event(self, conn: _Connection, msg: dict[str, Any]) -> None:
        """``join`` / ``leave`` / ``presence_diff``: emitted as Leave and Join events."""
        channel = _field(msg, "channel", str)
        sub = self._subs.get(channel)
        if sub is None or sub._conn is not conn:
            return  # left meanwhile
        if msg["type"] == "presence_diff":
            leaves, joins = msg.get("leaves"), msg.get("joins")
            if not isinstance(leaves, list) or not isinstance(joins, list):
                raise _ProtocolError("'presence_diff' message needs 'joins' and 'leaves' lists")
        elif msg["type"] == "join":
            leaves, joins = [], [msg.get("member")]
        else:
            leaves, joins = [msg.get("member")], []
        for member in leaves:
            self._emit(Leave(channel, _member(member)))
        for member in joins:
            self._emit(Join(channel, _member(member)))

    def _resync(self, conn: _Connection, sub: Subscription) -> None:
        """Fetch the full value of a delta channel: resubscribe (unsubscribe, subscribe
        with the position of the value held). Messages of the channel are ignored until the
        new subscribe is sent; the server answers it with the full value."""
        if sub._resyncing:
            return  # patches queued before the resubscription: the full value follows
        log.info("channel %r: a delta does not apply to the value held; fetching the full value",
                 sub.channel)
        sub._resyncing = True
        sub._resyncs += 1
        sub._conn = None
        self._enqueue(_Request(_Kind.UNSUBSCRIBE, sub.channel, target=conn))
        self._enqueue(_Request(_Kind.SUBSCRIBE, sub.channel, sub=sub))

    def _ended_by_server(self, conn: _Connection, channel: str) -> None:
        """The server sent ``unsubscribed`` without a ref: a refresh took the channel away."""
        sub = self._subs.get(channel)
        if sub is not None and sub._conn is conn:
            self._refused(sub, SubscriptionEnded(
                f"the server ended the subscription to {channel!r}: the refreshed token's "
                f"channels no longer include it", channel=channel))

    def _refused(self, sub: Subscription, error: ClientError) -> None:
        if self._subs.get(sub.channel) is sub:
            del self._subs[sub.channel]
        sub._conn = None
        sub._finish(error)

    async def _writer(self, conn: _Connection) -> None:
        try:
            while True:
                while not self._queue:
                    await self._writer_lot.park()
                request = self._queue.popleft()
                if request.kind is _Kind.PUBLISH:
                    self._queued_publishes -= 1
                    self._room_lot.unpark_all()
                elif request.kind is _Kind.SUBSCRIBE:
                    sub = request.sub
                    if sub is None or sub._end is not None:
                        request.resolve(sub)  # unsubscribed meanwhile
                        continue
                elif request.kind is _Kind.UNSUBSCRIBE and request.target is not conn:
                    request.resolve(None)  # that subscription ended with its connection
                    continue
                await self._send(conn, request)
        except ConnectionClosed:
            pass  # the reader sees the close too and ends the connection

    async def _send(self, conn: _Connection, request: _Request) -> None:
        request.ref = next(self._refs)
        request.conn = conn
        if request.kind is _Kind.SUBSCRIBE and request.sub is not None:
            request.since = request.sub._cursor.since()
            request.sub._conn = conn
        self._pending[request.ref] = request
        request.set_stage(_Stage.SENDING)
        payload = self._encode(request.message())
        sent = False
        try:
            await conn.ws.send_message(payload)
            sent = True
        finally:
            if not sent:
                self._unsend(conn, request)
        if request.stage is _Stage.SENDING:  # (the answer may already have arrived)
            request.set_stage(_Stage.SENT)

    def _unsend(self, conn: _Connection, request: _Request) -> None:
        """``request`` was not (completely) written: the server never saw it."""
        if request.ref is not None:
            self._pending.pop(request.ref, None)
        request.ref = request.conn = None
        if request.kind is not _Kind.PUBLISH:
            if request.sub is not None and request.sub._conn is conn:
                request.sub._conn = None
            request.resolve(request.sub)
        elif self._state is ClientState.CLOSED:
            request.fail(self._closed_exception())
        else:  # back to the front: it goes out first on the next connection
            self._queue.appendleft(request)
            self._queued_publishes += 1
            request.set_stage(_Stage.QUEUED)

    async def _keepalive(self, conn: _Connection, scope: trio.CancelScope) -> None:
        """Ping every heartbeat; no pong within ping_timeout ends the connection (1006)."""
        while True:
            await trio.sleep(conn.heartbeat)
            conn.paused_during_ping = conn.paused
            with trio.move_on_after(self._ping_timeout) as timer:
                try:
                    await conn.ws.ping()
                except ConnectionClosed:
                    return
            if timer.cancelled_caught and not conn.paused_during_ping:
                # (A paused reader cannot take the pong in: that is not a dead connection.)
                log.info("no pong from %s within %ss; reconnecting", self.url, self._ping_timeout)
                conn.end(CLOSE_ABNORMAL, f"no pong within ping_timeout={self._ping_timeout}s",
                         send=(CLOSE_GOING_AWAY, "no pong"))
                scope.cancel()
                return
