"""The front door of every TCP connection: read the HTTP request with h11, then route it.

A WebSocket upgrade to ``/ws`` is handed to trio-websocket on a stream that
replays the bytes h11 already read; anything else is answered as plain HTTP with
keep-alive. A connection that does not deliver a complete request within
``handshake_timeout`` is dropped (slowloris).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from functools import partial
from collections.abc import Awaitable, Callable, Iterator
from urllib.parse import parse_qs, urlsplit
from typing import TYPE_CHECKING, Any

import h11
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection, BytesMessage, CloseConnection, Event, Ping, Pong, RejectConnection, RejectData,
    Request, TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from .. import fastpath, logs
from ..core.auth import Identity
from ..core.codec import BY_SUBPROTOCOL, JSON, SUPPORTED_SUBPROTOCOLS, Codec, negotiate
from . import fallback, http_api
from .ws import (
    CLOSE_GOING_AWAY,
    CLOSE_GRACE_SECONDS,
    CLOSE_INTERNAL_ERROR,
    MAX_TICK_MS,
    MIN_TICK_MS,
    Connection,
)

if TYPE_CHECKING:
    from .app import RelayServer

log = logging.getLogger("relay.server")

MAX_REQUEST_HEAD_BYTES = 16 * 1024
RECEIVE_BYTES = 16 * 1024
#: Client messages are handed to the connection in trio-websocket's reader task
#: (``_ServerWebSocket.deliver``); only one parsed before the connection is attached
#: waits in trio-websocket's channel, which is therefore unbuffered.
MESSAGE_QUEUE_SIZE = 0
WS_PATH = "/ws"


class ReplayStream(trio.abc.Stream):
    """A stream that first returns the request head already read from ``inner``, then,
    once :meth:`answered` was called, the bytes read after the head, then reads ``inner``.

    Holding back everything after the request until the handshake is answered keeps
    wsproto's frame parser empty when the connection opens, so the reader can parse
    frames itself from the first one (``_ServerWebSocket._read_frames``).

    ``socket`` is the raw socket only when ``inner`` is a plain socket stream: under TLS
    it is None, so nobody writes around the encryption (see ``Connection``'s direct sends).
    """

    def __init__(self, inner: trio.abc.Stream, head: bytes, early: bytes = b"") -> None:
        self._inner = inner
        self._prefix = head
        self._early = early
        self._answered = trio.Event()
        #: Called once the replayed bytes have all been read (and the handshake answered).
        self.on_replayed: Callable[[], None] | None = None

    @property
    def inner(self) -> trio.abc.Stream:
        return self._inner

    @property
    def socket(self) -> trio.socket.SocketType | None:
        return self._inner.socket if isinstance(self._inner, trio.SocketStream) else None

    def answered(self) -> None:
        """The handshake was answered (accepted or refused): let the reader go on."""
        self._answered.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            n = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            return data
        await self._answered.wait()
        if self._early:
            data, self._early = self._early, b""
            return data
        if self.on_replayed is not None:
            self.on_replayed()
            self.on_replayed = None
        return await self._inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._inner.aclose()


class _ServerWebSocket(trio_websocket.WebSocketConnection):
    """trio-websocket's connection, answering frames it cannot parse with a close frame.

    wsproto reports a frame it cannot parse (invalid UTF-8 in a text frame: 1007; a
    protocol violation: 1002) as a close *event* while the connection is still open,
    and trio-websocket then drops the TCP connection without sending anything, so the
    client only sees 1006. RFC 6455 says to send the close code first; this does.
    """

    # Slots, not instance attributes: trio-websocket's instances already have as many
    # attributes as CPython shares between instances, and three more would give every
    # connection a dict of its own (about 1.6 KiB).
    __slots__ = ("on_pong", "deliver", "on_reader_done", "before_close", "_scanning", "_partial",
                 "_unscanned")

    #: Called for every pong received (the connection's heartbeat bookkeeping).
    on_pong: Callable[[], None] | None
    #: Set by the connection: handles each complete client message in the reader task,
    #: instead of passing it through a channel to another task.
    deliver: Callable[[str | bytes], Awaitable[None]] | None
    #: Set by the connection: called once the reader task has ended.
    on_reader_done: Callable[[], None] | None
    #: Set by the connection: writes what it has queued before the reader answers a close.
    before_close: Callable[[], Awaitable[None]] | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_pong = self.deliver = self.on_reader_done = self.before_close = None
        #: Whether the reader parses frames itself (:meth:`_read_frames`): None until the
        #: connection is open, False once it left the rest to wsproto.
        self._scanning: bool | None = None
        #: An incomplete frame read so far (None: none).
        self._partial: bytearray | None = None
        #: Bytes read after a control frame, not scanned yet.
        self._unscanned: bytes = b""

    def _reader_done(self) -> None:
        callback, self.on_reader_done = self.on_reader_done, None
        if callback is not None:
            callback()

    async def _reader_task(self) -> None:
        """trio-websocket's reader loop (0.12.2, pinned), reading complete text and binary
        frames itself (:meth:`_read_frames`) and leaving everything else to wsproto; with
        one table of event handlers for every connection (trio-websocket builds a dict of
        bound methods per connection) and the message channel closed through whatever
        stands for it at the end (:meth:`drop_message_channel`); then the connection is
        told the reader is done."""
        try:
            try:
                while self._reader_running:
                    for event in self._wsproto.events():
                        handler = _EVENT_HANDLERS.get(type(event))
                        if handler is None:
                            log.warning("%s received unknown event type: %r", self, type(event))
                            continue
                        try:
                            await handler(self, event)
                        except trio_websocket.ConnectionClosed:
                            self._reader_running = False
                            break
                    if not self._reader_running:
                        break
                    data: bytes | bytearray
                    if self._unscanned:  # what followed a control frame: no read needed
                        data, self._unscanned = self._unscanned, b""
                    else:
                        try:
                            data = await self._stream.receive_some(self._receive_buffer_size)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            await self._abort_web_socket()
                            break
                        if not data:  # TCP closed (before a close frame: abnormal closure)
                            if self._wsproto.state is not ConnectionState.CLOSED:
                                await self._abort_web_socket()
                            break
                    if self._wsproto.state is ConnectionState.CLOSED:
                        continue
                    scanning = self._scanning
                    if scanning is None and self._wsproto.state is ConnectionState.OPEN:
                        scanning = self._scanning = True  # (from the first frame: see ReplayStream)
                    if scanning:
                        data = await self._read_frames(data)
                        if not data:
                            continue
                    try:
                        self._wsproto.receive_data(data)  # type: ignore[arg-type]  # (bytes)
                    except RemoteProtocolError as err:
                        if err.event_hint:
                            await self._send(err.event_hint)
                        await self._close_stream()
            finally:
                await self._send_channel.aclose()
        finally:
            self._reader_done()

    async def _read_frames(self, data: bytes | bytearray) -> bytes | bytearray:
        """The fast path of the reader: hand every complete, final, masked text or binary
        frame of ``data`` (after what an earlier read left incomplete) to the connection,
        parsed in one call (:func:`relay.fastpath.scan_client_frames`) instead of by
        wsproto, and return what wsproto must parse: one control frame (what follows it
        is scanned next), or, from the first frame the scan leaves to wsproto (a
        fragment, reserved bits, an oversized or malformed frame, text that is not
        UTF-8), everything, for the rest of the connection. wsproto so only ever sees
        whole frames while the fast path runs, and has no state of its own to resume."""
        partial = self._partial
        if partial is not None:
            partial += data
            data = partial
        frames, used, stop = fastpath.scan_client_frames(data, self._max_message_size)
        if partial is not None:
            del partial[:used]
            rest: bytes | bytearray = partial
        else:
            rest = data[used:]
        self._partial = None
        if stop == fastpath.SCAN_MORE:
            if rest:
                self._partial = rest if isinstance(rest, bytearray) else bytearray(rest)
            rest = b""
        elif stop == fastpath.SCAN_OTHER:
            self._scanning = False
        for opcode, value in frames:
            if opcode >= fastpath.OP_CLOSE:  # the last one (SCAN_CONTROL)
                self._unscanned = bytes(rest)
                return value  # type: ignore[no-any-return]
            deliver = self.deliver
            if deliver is not None:
                await deliver(value)
            else:  # not attached yet: trio-websocket's way (its channel)
                event = TextMessage(data=value) if opcode == fastpath.OP_TEXT else BytesMessage(data=value)
                await self._handle_message_event(event)
        return rest

    def drop_message_channel(self) -> None:
        """Free trio-websocket's message channel once every message goes to ``deliver``
        (nothing is sent through it or waited on any more; about 2 KiB per connection)."""
        self._send_channel = self._recv_channel = _NO_MESSAGES  # type: ignore[assignment]

    async def _close_web_socket(self, code: int, reason: str | None = None) -> None:
        # the point where trio-websocket ends get_message(): no message follows
        await super()._close_web_socket(code, reason)
        self._reader_done()

    async def _handle_message_event(self, event: TextMessage | BytesMessage) -> None:
        if not self._reader_running:
            # The reader is stopping (a message over max_message_size was answered with
            # 1009, or the connection is closing): what was parsed after that is not handled.
            return
        deliver = self.deliver
        oversized = self._message_size + len(event.data) > self._max_message_size
        if deliver is None or not event.message_finished or oversized:
            # a fragment, a message over max_message_size (1009), or one parsed before the
            # connection is attached (it waits in the channel): trio-websocket's own way
            if oversized:
                await self._answering_close()
            await super()._handle_message_event(event)
            if self._close_reason is not None:  # over max_message_size: closed with 1009
                self._reader_done()
            return
        parts = self._message_parts
        if parts:
            parts.append(event.data)
            message: str | bytes = b"".join(parts) if isinstance(event, BytesMessage) else "".join(parts)
            self._message_parts = []
            self._message_size = 0
        else:
            message = bytes(event.data) if isinstance(event, BytesMessage) else event.data
        await deliver(message)

    async def _handle_pong_event(self, event: Pong) -> None:
        if self.on_pong is not None:
            self.on_pong()
        await super()._handle_pong_event(event)

    async def _handle_ping_event(self, event: Ping) -> None:
        # A ping that crossed our close frame: RFC 6455 lets us ignore it, and wsproto
        # refuses to build a pong once the close is sent (LocalProtocolError).
        if self._wsproto.state is ConnectionState.OPEN:
            await super()._handle_ping_event(event)

    async def _answering_close(self) -> None:
        """A close frame is about to be sent in answer to the peer: let the connection
        write what it has queued first."""
        if self.before_close is not None and self._close_reason is None:
            await self.before_close()

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        await self._answering_close()
        if self._wsproto.state is ConnectionState.OPEN:
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                await self._send(CloseConnection(code=event.code, reason=event.reason))
        await super()._handle_close_connection_event(event)


_EVENT_HANDLERS: dict[type[Event], Callable[[Any, Any], Awaitable[None]]] = {
    AcceptConnection: _ServerWebSocket._handle_accept_connection_event,
    BytesMessage: _ServerWebSocket._handle_message_event,
    CloseConnection: _ServerWebSocket._handle_close_connection_event,
    Ping: _ServerWebSocket._handle_ping_event,
    Pong: _ServerWebSocket._handle_pong_event,
    RejectConnection: _ServerWebSocket._handle_reject_connection_event,
    RejectData: _ServerWebSocket._handle_reject_data_event,
    Request: _ServerWebSocket._handle_request_event,
    TextMessage: _ServerWebSocket._handle_message_event,
}


class _NoMessages:
    """Stands in for both ends of trio-websocket's message channel once the connection
    handles every message in the reader task: closed, empty, shared by all connections."""

    __slots__ = ()

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send(self, value: object) -> None:
        await trio.lowlevel.checkpoint()
        raise trio.ClosedResourceError("messages are delivered in the reader task")

    def receive_nowait(self) -> object:
        raise trio.EndOfChannel

    async def receive(self) -> object:
        await trio.lowlevel.checkpoint()
        raise trio.EndOfChannel


_NO_MESSAGES = _NoMessages()


class _SpentHandshake:
    """Stands in for wsproto's ``H11Handshake`` once a connection is open.

    ``WSConnection`` only asks an open connection's handshake for left-over events;
    dropping the real one frees its h11 parser for the connection's lifetime.
    """

    __slots__ = ()

    def events(self) -> Iterator[Event]:
        return iter(())


_SPENT_HANDSHAKE = _SpentHandshake()


def _release_handshake_state(ws: trio_websocket.WebSocketConnection) -> None:
    """Free what an open connection no longer needs: the handshake's h11 parser."""
    proto = ws._wsproto
    if proto.connection is not None:  # its one event, the request, has been read
        proto.handshake = _SPENT_HANDSHAKE


async def _wrap_server_stream(nursery: trio.Nursery, stream: trio.abc.Stream,
                              max_message_size: int) -> trio_websocket.WebSocketRequest:
    """Like ``trio_websocket.wrap_server_stream``, with :class:`_ServerWebSocket`."""
    connection = _ServerWebSocket(
        stream, WSConnection(ConnectionType.SERVER), max_message_size=max_message_size,
        message_queue_size=MESSAGE_QUEUE_SIZE, receive_buffer_size=RECEIVE_BYTES)
    if isinstance(stream, ReplayStream) and isinstance(stream.inner, trio.SocketStream):
        # Once the request bytes are replayed, trio-websocket reads the socket directly
        # (one layer less on every read; under TLS the SSLStream stays wrapped).
        stream.on_replayed = partial(setattr, connection, "_stream", stream.inner)
    nursery.start_soon(connection._reader_task)
    return await connection._get_request()


def _peer(stream: trio.SocketStream) -> str:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return "?"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key == name:
            return value
    return None


def _is_upgrade(request: h11.Request) -> bool:
    upgrade = _header(request, b"upgrade")
    return upgrade is not None and upgrade.lower() == b"websocket"


class _Reader:
    """Feeds h11 from the socket and keeps the raw bytes of the first request.

    While the connection waits for a request (or is in the WebSocket handshake) it
    counts as *pending* in ``server.pending_connections`` (``max_pending_connections``).
    """

    def __init__(self, stream: trio.abc.Stream, server: RelayServer) -> None:
        self.stream = stream
        self._server = server
        self._pending = False
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
        self.raw = bytearray()
        self.keep_raw = True
        #: The upgrade request between the request loop and the WebSocket handshake.
        self.upgrade_request: h11.Request | None = None

    def pending(self, pending: bool) -> None:
        """Count this connection as pending (waiting for a request) or not."""
        if pending != self._pending:
            self._pending = pending
            self._server.pending_connections += 1 if pending else -1

    async def next_event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = bytes(await self.stream.receive_some(RECEIVE_BYTES))  # TLS may give bytearray
            if self.keep_raw:
                self.raw += data
            self.h11.receive_data(data)

    async def read_body(self, limit: int) -> bytes | None:
        """Return the request body, or None when it is over ``limit`` bytes."""
        body = bytearray()
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    return None
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in a request body")


async def handle_stream(server: RelayServer, stream: trio.SocketStream) -> None:
    """Serve one TCP connection until it closes; never raises.

    With TLS configured the stream is wrapped in a ``trio.SSLStream`` first; its
    handshake happens within ``handshake_timeout``, on the first read.
    """
    peer = _peer(stream)
    cap = server.config.limits.max_pending_connections
    if cap and server.pending_connections >= cap:
        await _refuse_pending(server, stream, peer, cap)
        return
    served: trio.abc.Stream = stream
    if server.ssl_context is not None:
        served = trio.SSLStream(stream, server.ssl_context, server_side=True, https_compatible=True)
    try:
        await _serve(server, served, peer)
    except trio.BrokenResourceError as exc:
        # The peer reset the connection, or the TLS handshake failed (an untrusted
        # certificate, plain HTTP on a TLS port): bad input, not a server error.
        log.debug("dropped %s: %s", peer, exc.__cause__ or exc)
    except Exception:
        log.exception("unexpected error serving %s", peer)
    finally:
        await trio.aclose_forcefully(served)


_OVER_CAPACITY = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nConnection: close\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s")


async def _refuse_pending(server: RelayServer, stream: trio.SocketStream, peer: str, cap: int) -> None:
    """Close a new TCP connection at once: too many connections wait for a request.

    Plain HTTP gets a 503 first (nothing is read); under TLS there is no way to answer
    before a handshake, so the connection is just closed.
    """
    server.metrics.handshakes_refused.labels("too_many_pending").inc()
    log.debug("refused %s: %d connections already wait for a request (max_pending_connections)", peer, cap)
    try:
        if server.ssl_context is None:
            body = json.dumps({"error": "over_capacity", "message": (
                f"too many connections wait for a request (max_pending_connections={cap:,}); "
                "retry later")}).encode()
            with trio.move_on_after(1):
                await stream.send_all(_OVER_CAPACITY % (len(body), body))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _send(reader: _Reader, response: http_api.Response, *, method: str = "GET", close: bool = False) -> None:
    headers = [("Content-Type", response.content_type), ("Content-Length", str(len(response.body)))]
    headers += response.headers
    if close:
        headers.append(("Connection", "close"))
    conn = reader.h11
    data = conn.send(h11.Response(status_code=response.status, headers=headers))
    if method != "HEAD":
        data += conn.send(h11.Data(data=response.body))
    data += conn.send(h11.EndOfMessage())
    await reader.stream.send_all(data)


async def _serve(server: RelayServer, stream: trio.abc.Stream, peer: str) -> None:
    reader = _Reader(stream, server)
    try:
        await _serve_requests(server, reader, peer)
    finally:
        reader.pending(False)


async def _serve_requests(server: RelayServer, reader: _Reader, peer: str) -> None:
    cfg = server.config
    first = True
    while True:
        timeout = cfg.handshake_timeout if first else cfg.http_idle_timeout
        reader.pending(True)
        with trio.move_on_after(timeout) as scope:
            try:
                event = await reader.next_event()
                if not isinstance(event, h11.Request):
                    return  # closed before a request (or a stray event): nothing to answer
                client = server.trusted_proxies.client(peer, event.headers)
                if _is_upgrade(event):
                    if not first:
                        await _send(reader, http_api.error_response(
                            400, "bad_request", "a WebSocket upgrade must be the first request"), close=True)
                        return
                    scope.deadline = trio.current_time() + cfg.handshake_timeout
                    # Handed over through the reader so that no frame of this task keeps
                    # the request's headers alive for the connection's lifetime.
                    reader.upgrade_request = event
                    del event
                    await _upgrade(server, reader, client, scope)
                    return
                scope.deadline = trio.current_time() + cfg.handshake_timeout
                reader.keep_raw = False
                method = event.method.decode("ascii", "replace")
                target = event.target.decode("ascii", "replace")
                headers = event.headers
                body = await reader.read_body(cfg.max_message_size)
                reader.pending(False)
            except h11.RemoteProtocolError as exc:
                if reader.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint
                    with trio.move_on_after(1):
                        await _send(reader, http_api.error_response(status, "bad_request", str(exc)), close=True)
                return
        if scope.cancelled_caught:
            if first or reader.h11.their_state is not h11.IDLE:
                log.debug("dropped %s: no complete request within %ss", peer, timeout)
            return
        if body is None:
            response = http_api.error_response(
                413, "too_large", f"body exceeds max_message_size={cfg.max_message_size:,} bytes")
            route_name, close = "too_large", True
        elif fallback.handles(event.target):
            route_name, answer = await fallback.route(server, reader, method, event.target, body, headers, client)
            if answer is None:  # an event stream: it used the connection to its end
                server.metrics.http_requests.labels(route_name, "200").inc()
                return
            response, close = answer, server.draining
        else:
            route_name, response = await http_api.route(server, method, target, body, headers)
            close = server.draining
        server.metrics.http_requests.labels(route_name, str(response.status)).inc()
        await _send(reader, response, method=method, close=close)
        if close or reader.h11.our_state is h11.MUST_CLOSE:
            return
        try:
            reader.h11.start_next_cycle()
        except h11.LocalProtocolError:
            return
        first = False


async def _upgrade(server: RelayServer, reader: _Reader, peer: str, handshake: trio.CancelScope) -> None:
    metrics = server.metrics
    request, reader.upgrade_request = reader.upgrade_request, None
    assert request is not None
    path = request.target.split(b"?", 1)[0]
    if path != WS_PATH.encode():
        metrics.handshakes_refused.labels("not_found").inc()
        await _send(reader, http_api.error_response(
            404, "not_found", f"WebSocket endpoint is {WS_PATH}"), close=True)
        return
    tick_ms = tick_ms_of(request.target)
    if isinstance(tick_ms, str):
        metrics.handshakes_refused.labels("bad_request").inc()
        await _send(reader, http_api.error_response(400, "bad_request", tick_ms), close=True)
        return
    admission = server.security.check_upgrade(request.headers, request.target, peer, metrics)
    if isinstance(admission, http_api.Response):
        await _send(reader, admission, close=True)
        return
    del request
    try:
        await _accept(server, reader, peer, handshake, admission.identity, tick_ms)
    finally:
        server.security.release(admission)


def tick_ms_of(target: bytes) -> int | str:
    """Return the ``tick_ms`` query parameter of a WebSocket URL (0 when absent), or why
    it is refused."""
    query = urlsplit(target.decode("latin-1")).query
    values = parse_qs(query, keep_blank_values=True).get("tick_ms") if query else None
    if not values:
        return 0
    allowed = f"an integer from {MIN_TICK_MS} to {MAX_TICK_MS} (milliseconds between deliveries)"
    if len(values) > 1:
        return f"tick_ms is given {len(values)} times; give it once, {allowed}"
    text = values[0]
    if not (text.isascii() and text.isdigit()) or not MIN_TICK_MS <= int(text) <= MAX_TICK_MS:
        return f"tick_ms must be {allowed}, got {text[:40]!r}"
    return int(text)


async def _accept(server: RelayServer, reader: _Reader, peer: str, handshake: trio.CancelScope,
                  identity: Identity, tick_ms: int = 0) -> None:
    """Complete the WebSocket handshake of an admitted upgrade and serve the connection."""
    # What h11 has not consumed of the bytes read is what the client sent after the request.
    raw, early = bytes(reader.raw), reader.h11.trailing_data[0]
    stream = ReplayStream(reader.stream, raw[:len(raw) - len(early)], early)
    del raw
    # The HTTP side is done with: free its buffers for the connection's lifetime.
    reader.raw = bytearray()
    reader.h11 = None  # type: ignore[assignment]
    conn: Connection | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                ws = await _handshake(server, nursery, stream)
            except trio_websocket.ConnectionClosed:
                ws = None  # the peer left during the handshake: nothing to answer
            finally:
                stream.answered()
            reader.pending(False)
            if ws is None:
                nursery.cancel_scope.cancel()
                return
            handshake.deadline = float("inf")
            conn = Connection(server, ws, codec_of(ws), peer, identity, tick_ms)
            server.add_connection(conn)
            log.info("connection open", extra=logs.fields(
                event="open", conn=conn.id, remote=peer, user=identity.user, encoding=conn.codec.name))
            try:
                await conn.serve()
            except Exception:
                log.exception("connection %s (%s): unexpected error; closing with 1011", conn.id, peer)
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_GRACE_SECONDS):
                    await ws.aclose(CLOSE_INTERNAL_ERROR, "internal error")
            finally:
                server.remove_connection(conn)
                # Still open here only when the server stops (cancellation, drain timeout, a
                # second signal): 1001 tells clients to reconnect; 1000 would tell them not to.
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_GRACE_SECONDS):
                    await ws.aclose(CLOSE_GOING_AWAY, "server stopping")
                reason = ws.closed
                server.metrics.connections_closed.labels(str(reason.code) if reason else "none").inc()
                log.info("connection closed", extra=logs.fields(
                    event="close", conn=conn.id, remote=peer, user=conn.guard.identity.user,
                    duration_s=round(time.time() - conn.started_at, 3),
                    code=reason.code if reason else None, reason=(reason.reason or "") if reason else "no close frame"))
                nursery.cancel_scope.cancel()
    finally:
        if conn is not None:  # its tasks have ended (the nursery is done)
            conn.release()


def codec_of(ws: trio_websocket.WebSocketConnection) -> Codec:
    """Return the codec of an accepted connection (JSON when no subprotocol was chosen)."""
    return BY_SUBPROTOCOL.get(ws.subprotocol or "", JSON)


async def _handshake(server: RelayServer, nursery: trio.Nursery,
                     stream: ReplayStream) -> _ServerWebSocket | None:
    """Negotiate the subprotocol and accept, or refuse with a status that says why."""
    metrics = server.metrics
    ws_request = await _wrap_server_stream(nursery, stream, server.config.max_message_size)
    codec = negotiate(ws_request.proposed_subprotocols)
    if codec is None:
        metrics.handshakes_refused.labels("subprotocol").inc()
        offered = ", ".join(ws_request.proposed_subprotocols)
        await ws_request.reject(400, body=(
            f"unsupported subprotocol(s): {offered}; supported: "
            f"{', '.join(SUPPORTED_SUBPROTOCOLS)}\n").encode())
        return None
    if server.draining:
        metrics.handshakes_refused.labels("draining").inc()
        # Retry-After: another node (behind the same address) can take it at once.
        await ws_request.reject(503, extra_headers=[(b"Retry-After", b"1")],
                                body=b"server is draining; retry on another node\n")
        return None
    starting = server.starting()
    if starting is not None:
        metrics.handshakes_refused.labels("starting").inc()
        await ws_request.reject(503, extra_headers=[(b"Retry-After", b"1")], body=(
            f"server is starting: {starting}; retry on another node\n").encode())
        return None
    chosen = codec.subprotocol if ws_request.proposed_subprotocols else None
    ws = await ws_request.accept(subprotocol=chosen)
    assert isinstance(ws, _ServerWebSocket)  # (made by _wrap_server_stream)
    _release_handshake_state(ws)
    return ws
