"""HTTP transports for browsers that cannot use WebSocket, and the browser client itself.

Routes (the front door hands them over, :func:`handles`):

- ``GET /sse?channel=A&channel=B[&since=E:N&since=...]``: a Server-Sent Events stream of
  the same messages a WebSocket subscriber gets, through the hub's fan-out.
- ``GET /poll?channel=A[&since=E:N][&timeout=S]``: long-polling; answers at once when
  something newer than ``since`` is there (or a channel has no ``since``, or it cannot
  be recovered), else waits up to ``poll_timeout`` seconds.
- ``POST /publish``: a client publish over HTTP, with the user's token (not an API key),
  under the same rules as a WebSocket ``publish``.
- ``GET /client.js``: the browser client (``relay/static/client.js``).

Each stream or poll is a hub subscriber (:class:`_Subscriber`) with its own bounded
outbox and no socket descriptor, so the hub's direct sends never write to it: the
handler's own task takes the outbox's frames, which are the JSON WebSocket frames
encoded once per publication, strips their 2-10 byte headers and writes the JSON as
SSE events (or a poll answer). Same checks as a WebSocket: origin, token, connection
caps, channel permissions, ``max_subscriptions``, the slow-consumer policies.

Positions, so that switching transports or reconnecting loses nothing and repeats
nothing: ``since`` values are ``EPOCH:OFFSET``, one per channel in the order of the
``channel`` parameters (empty for none). Every SSE event id is the list of every
channel's position after that event, in the same order (``E1:N1,E2:N2``), so
``Last-Event-ID`` resumes all channels at once; a poll answer carries the same list as
``since``. A position is "the last offset delivered" except right after ``subscribed``,
where it is the offset just before the first message that follows, so a stream cut
between the two resumes with that message.

Rate limits: HTTP requests carry no connection, so publishes, polls and stream opens
count against one limiter per user (per client address when anonymous) with the limits
of one WebSocket connection; over them the answer is 429.
"""

from __future__ import annotations

import logging
import secrets
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from .. import fastpath, logs
from ..core.auth import Identity
from ..core.codec import JsonCodec, dumps_json, loads_json
from ..core.envelope import Since, validate_channel
from ..core.ratelimit import MessageLimiter, Verdict
from ..errors import BadRequest, Forbidden, PeerError, Unauthorized, Unavailable
from .http_api import JSON_TYPE, Response, error_response, json_response, read_publish_body
from .security import CLOSE_RATE_LIMITED, Guard, header, peer_ip
from .ws import CLOSE_GRACE_SECONDS

if TYPE_CHECKING:
    from .app import RelayServer

log = logging.getLogger("relay.fallback")

SSE_PATH = "/sse"
POLL_PATH = "/poll"
PUBLISH_PATH = "/publish"
CLIENT_JS_PATH = "/client.js"
PATHS = (SSE_PATH, POLL_PATH, PUBLISH_PATH, CLIENT_JS_PATH)
#: What an EventSource waits before reconnecting by itself (the SSE ``retry`` field).
SSE_RETRY_MS = 2000
#: Longest epoch accepted in a position (server epochs are 8 hex digits).
MAX_EPOCH_LENGTH = 64
#: Users (or client addresses) whose HTTP rate limiter is remembered at once.
MAX_LIMITERS = 10_000
#: Seconds a client over its HTTP rate limit is asked to wait.
RATE_LIMITED_RETRY_SECONDS = 1
CORS_MAX_AGE_SECONDS = 600
CLOSE_GOING_AWAY = 1001
CLOSE_TRY_AGAIN_LATER = 1013
JS_TYPE = "text/javascript; charset=utf-8"
SSE_TYPE = "text/event-stream; charset=utf-8"

_STATUS_BY_CODE = {"bad_request": 400, "unauthorized": 401, "forbidden": 403, "too_large": 413}


class _TransportCodec(JsonCodec):
    """JSON frames, under the transport's name (metrics label the connections with it)."""

    def __init__(self, name: str) -> None:
        self.name = name


_SSE_CODEC = _TransportCodec("sse")
_POLL_CODEC = _TransportCodec("poll")


def handles(target: bytes) -> bool:
    """Return whether the request target is one of this module's routes."""
    return urlsplit(target.decode("ascii", "replace")).path in PATHS


# --------------------------------------------------------------------------- the client


def _load_client_js() -> bytes:
    return resources.files("relay").joinpath("static/client.js").read_bytes()


_CLIENT_JS: bytes | None = None


def _client_js(method: str) -> Response:
    global _CLIENT_JS
    if method not in ("GET", "HEAD"):
        return _not_allowed("GET")
    if _CLIENT_JS is None:
        _CLIENT_JS = _load_client_js()
    return Response(200, _CLIENT_JS, JS_TYPE, [
        ("Access-Control-Allow-Origin", "*"),
        ("Cache-Control", "no-cache"),
        ("X-Content-Type-Options", "nosniff"),
    ])


# --------------------------------------------------------------------------- helpers


def _not_allowed(allowed: str) -> Response:
    r = error_response(405, "method_not_allowed", f"use {allowed}")
    r.headers.append(("Allow", allowed))
    return r


def _peer_error(exc: PeerError, **extra: Any) -> Response:
    body: dict[str, Any] = {"error": exc.code, "message": exc.message}
    if isinstance(exc, Unauthorized):
        body["reason"] = exc.reason
    body.update(extra)
    return json_response(_STATUS_BY_CODE.get(exc.code, 400), body)


def _cors(headers: Sequence[tuple[bytes, bytes]], response: Response) -> Response:
    """Let the page that asked read the answer (a refused origin only ever gets a 403)."""
    origin = header(headers, b"origin")
    if origin is not None:
        response.headers += [("Access-Control-Allow-Origin", origin.decode("latin-1")), ("Vary", "Origin")]
    return response


def _preflight(server: RelayServer, headers: Sequence[tuple[bytes, bytes]]) -> Response:
    refusal = server.security.check_origin(headers)
    if refusal is not None:
        return refusal
    return Response(204, b"", "text/plain; charset=utf-8", [
        ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
        ("Access-Control-Allow-Headers", "Authorization, Content-Type, Last-Event-ID"),
        ("Access-Control-Max-Age", str(CORS_MAX_AGE_SECONDS)),
    ])


def format_position(position: tuple[str, int] | None) -> str:
    """Return ``EPOCH:OFFSET`` ("" for an unknown position)."""
    return "" if position is None else f"{position[0]}:{position[1]}"


def parse_position(text: str, what: str) -> Since | None:
    """Parse ``EPOCH:OFFSET`` ("" is None).

    Raises:
        BadRequest: anything else; the message names ``what`` and the text.
    """
    text = text.strip()
    if not text:
        return None
    epoch, sep, offset = text.rpartition(":")
    if (not sep or not epoch or len(epoch) > MAX_EPOCH_LENGTH or not offset.isdigit()
            or len(offset) > 20 or any(c in epoch for c in ",: ")):
        raise BadRequest(
            f"{what} must be EPOCH:OFFSET (as in a subscribed event or an event id), got {text[:80]!r}")
    return Since(epoch, int(offset))


def _parse_channels(server: RelayServer, query: dict[str, list[str]],
                    headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[str, Since | None]]:
    """Return the requested channels with their ``since``, ``Last-Event-ID`` winning.

    No channel at all is allowed: such a stream carries only ``welcome``, ``ping`` and
    ``close`` (a client with no subscriptions yet), and such a poll checks the token.

    Raises:
        BadRequest: a bad or repeated name, a bad position, or more
            positions than channels.
    """
    names = query.get("channel", [])
    seen: set[str] = set()
    for name in names:
        validate_channel(name, server.config.max_channel_length)
        if name in seen:
            raise BadRequest(f"channel {name!r} is listed twice")
        seen.add(name)
    given = query.get("since", [])
    if len(given) > len(names):
        raise BadRequest(f"{len(given)} since values for {len(names)} channels; give one per channel, "
                         "in the order of the channel parameters (empty for none)")
    since = [parse_position(text, "since") for text in given] + [None] * (len(names) - len(given))
    last = header(headers, b"last-event-id")
    if last is not None and last.strip():
        parts = last.decode("latin-1").split(",")
        if len(parts) != len(names):
            raise BadRequest(f"Last-Event-ID holds {len(parts)} positions for {len(names)} channels")
        for i, part in enumerate(parts):
            position = parse_position(part, "each Last-Event-ID position")
            if position is not None:
                since[i] = position
    return list(zip(names, since))


class _Limiters:
    """One rate limiter per user (per address when anonymous), least recently used dropped."""

    def __init__(self) -> None:
        self._by_key: OrderedDict[str, MessageLimiter] = OrderedDict()

    def admit(self, server: RelayServer, identity: Identity, peer: str, size: int) -> Response | None:
        key = f"user {identity.user}" if identity.user else f"address {peer_ip(peer)}"
        now = trio.current_time()
        limiter = self._by_key.get(key)
        if limiter is None:
            limiter = self._by_key[key] = MessageLimiter(server.security.rate_limits, now)
            if len(self._by_key) > MAX_LIMITERS:
                self._by_key.popitem(last=False)
        else:
            self._by_key.move_to_end(key)
        verdict = limiter.admit(size, now)
        if verdict is Verdict.ALLOW:
            return None
        limits = server.security.rate_limits
        server.metrics.errors.labels("rate_limited").inc()
        retry = RATE_LIMITED_RETRY_SECONDS * (10 if verdict is Verdict.CLOSE else 1)
        response = json_response(429, {
            "error": "rate_limited",
            "message": f"request refused: over messages_per_second={limits.messages_per_second:g} "
                       f"(burst {limits.messages_burst}) or bytes_per_second={limits.bytes_per_second:,}; "
                       f"retry after {retry}s",
            "close_code": CLOSE_RATE_LIMITED if verdict is Verdict.CLOSE else None,
        })
        response.headers.append(("Retry-After", str(retry)))
        return response


_LIMITERS: weakref.WeakKeyDictionary[RelayServer, _Limiters] = weakref.WeakKeyDictionary()


def _limiters(server: RelayServer) -> _Limiters:
    found = _LIMITERS.get(server)
    if found is None:
        found = _LIMITERS[server] = _Limiters()
    return found


def _messages(data: bytes) -> Iterator[tuple[dict[str, Any], bytes]]:
    """Yield each message in ``data`` with its JSON: a ticked channel's frame (an array of
    messages, see ``tick_ms``) yields each of its messages, one event each."""
    for payload in _payloads(data):
        msg = loads_json(payload)
        if isinstance(msg, list):
            for item in msg:
                yield item, dumps_json(item)
        else:
            yield msg, payload


def _payloads(data: bytes) -> Iterator[bytes]:
    """Yield the payloads of the unmasked WebSocket frames in ``data`` (see ``encode_frame``)."""
    i, n = 0, len(data)
    while i < n:
        length = data[i + 1] & 0x7F
        i += 2
        if length == 126:
            length = int.from_bytes(data[i:i + 2], "big")
            i += 2
        elif length == 127:
            length = int.from_bytes(data[i:i + 8], "big")
            i += 8
        yield data[i:i + length]
        i += length


# --------------------------------------------------------------------------- subscriber


class _Subscriber:
    """A hub subscriber for one SSE stream or one poll; its handler's task does the writing.

    Also what :class:`RelayServer` tracks as a connection: ``kick`` (drain, token expiry,
    slow consumer) makes the handler end with a ``close`` event carrying the code.
    """

    def __init__(self, server: RelayServer, identity: Identity, codec: JsonCodec,
                 channels: list[tuple[str, Since | None]], remote: str) -> None:
        self.server = server
        self.codec = codec
        self.remote = remote
        self.id = secrets.token_hex(8)
        self.outbox = fastpath.Outbox(server.config.send_queue_size, codec.encoding, self)
        # (outbox.fd stays -1: fastpath.flush never writes here, it wakes us instead)
        self.subscriptions: set[str] = set()
        self.guard = Guard(server.security, identity, trio.current_time())
        self.started_at = time.time()
        self.channels = [name for name, _ in channels]
        self.since = dict(channels)
        #: Each channel's position: what was asked for until ``subscribed`` confirms one.
        self.positions: dict[str, tuple[str, int] | None] = {
            name: None if since is None else (since.epoch, since.offset) for name, since in channels}
        self.closing: tuple[int, str] | None = None
        self.send_scope: trio.CancelScope | None = None
        self._lot = trio.lowlevel.ParkingLot()

    def __repr__(self) -> str:
        return f"<{self.codec.name} {self.id} {self.remote}>"

    # -- what the hub, the guard and the server call ------------------------------------

    def wake(self) -> None:
        self._lot.unpark_all()

    def wake_writer(self) -> None:
        self._lot.unpark_all()

    def kick(self, code: int, reason: str) -> None:
        if self.closing is None:
            self.closing = (code, reason)
            if self.send_scope is not None:
                self.send_scope.deadline = min(self.send_scope.deadline, trio.current_time() + CLOSE_GRACE_SECONDS)
        self._lot.unpark_all()

    def ping(self, now: float) -> None:
        """(The server's heartbeat: an event stream writes its own keep-alive comments.)"""

    def check_pong(self, now: float, timeout: float) -> None:
        """(A dead HTTP client shows as a failed write or end of input instead.)"""

    def send(self, message: dict[str, Any]) -> None:
        self.outbox.put(self.codec.frame(message))
        self.wake()

    def send_error(self, code: str, message: str, ref: Any = None) -> None:
        self.server.metrics.errors.labels(code).inc()
        self.send({"type": "error", "code": code, "message": message})

    # -- the handler's side ---------------------------------------------------------------

    def subscribe_all(self) -> None:
        now = trio.current_time()
        for name in self.channels:
            self.server.hub.subscribe(self, name, self.since[name], None, now)

    async def wait(self, timeout: float) -> None:
        """Wait until something is queued or the subscriber is kicked, at most ``timeout`` s."""
        with trio.move_on_after(timeout):
            while not self.outbox.pending and self.closing is None:
                await self._lot.park()

    def take(self) -> list[tuple[dict[str, Any], bytes, str | None]]:
        """Take every queued event as ``(message, its JSON, event id or None)``."""
        outbox = self.outbox
        data = outbox.take()
        events: list[tuple[dict[str, Any], bytes]] = []
        for msg, payload in _messages(data):
            if msg.get("type") == "error":
                # A subscription the broker could not make (Redis unavailable): these
                # transports have no request to answer, so the client is told to come back.
                self.kick(CLOSE_TRY_AGAIN_LATER, f"{msg.get('code')}: {msg.get('message')}")
                continue
            events.append((msg, payload))
        for channel, lo, hi in outbox.take_gaps():
            gap = {"type": "gap", "channel": channel, "from": lo, "to": hi}
            events.append((gap, dumps_json(gap)))
        if outbox.dropped or outbox.conflated:
            self._count_slow_consumer_actions()
        out: list[tuple[dict[str, Any], bytes, str | None]] = []
        for i, (msg, payload) in enumerate(events):
            out.append((msg, payload, self._advance(msg, events, i)))
        return out

    def _count_slow_consumer_actions(self) -> None:
        box, metrics = self.outbox, self.server.metrics
        counted = getattr(self, "_counted", (0, 0))
        if box.dropped != counted[0]:
            metrics.slow_consumer("drop", box.dropped - counted[0])
        if box.conflated != counted[1]:
            metrics.slow_consumer("conflate", box.conflated - counted[1])
        self._counted = (box.dropped, box.conflated)

    def _advance(self, msg: dict[str, Any], batch: list[tuple[dict[str, Any], bytes]], i: int) -> str | None:
        """Move the channel's position past ``msg``; return the new event id (None: unchanged)."""
        kind, channel = msg.get("type"), msg.get("channel")
        if channel not in self.positions:
            return None
        current = self.positions[channel]
        if kind == "subscribed":
            epoch, offset = msg["epoch"], msg["offset"]
            # What follows in this batch (recovered messages, a state channel's value)
            # comes after the position, so a stream cut between them resumes with it.
            for later, _ in batch[i + 1:]:
                if later.get("channel") == channel and later.get("type") in ("message", "poke"):
                    offset = later["offset"] - 1
                    break
                if later.get("channel") == channel and later.get("type") == "subscribed":
                    break
            position: tuple[str, int] = (epoch, offset)
        elif kind in ("message", "poke"):
            epoch = msg.get("epoch") or (current[0] if current else "")
            position = (epoch, msg["offset"])
        elif kind == "gap":
            position = (current[0] if current else "", msg["to"])
        else:
            return None
        self.positions[channel] = position
        return self.event_id()

    def event_id(self) -> str:
        return ",".join(format_position(self.positions[name]) for name in self.channels)

    def close_event(self) -> dict[str, Any] | None:
        if self.closing is None:
            return None
        code, reason = self.closing
        return {"type": "close", "code": code, "reason": reason}


# --------------------------------------------------------------------------- admission


def _admit(server: RelayServer, kind: str, target: bytes, headers: Sequence[tuple[bytes, bytes]],
                 peer: str, codec: JsonCodec) -> tuple[Any, _Subscriber] | Response:
    """Run the WebSocket checks for a stream or a poll; return its admission and subscriber."""
    security = server.security
    query = parse_qs(urlsplit(target.decode("latin-1")).query, keep_blank_values=True)
    admission = security.check_upgrade(headers, target, peer, server.metrics)
    if isinstance(admission, Response):
        return admission
    try:
        channels = _parse_channels(server, query, headers)
        refusal = _limiters(server).admit(server, admission.identity, peer, len(target))
        if refusal is not None:
            security.release(admission)
            return refusal
        sub = _Subscriber(server, admission.identity, codec, channels, peer)
        for name, _ in channels:
            try:
                sub.guard.check_subscribe(name, sub.subscriptions, None)
            except Forbidden as exc:
                security.release(admission)
                return _peer_error(exc, channel=name)
            sub.subscriptions.add(name)  # (counted for max_subscriptions; the hub adds them for real)
        sub.subscriptions.clear()
    except PeerError as exc:
        security.release(admission)
        return _peer_error(exc)
    if server.draining:
        security.release(admission)
        response = error_response(503, "draining", "server is draining; retry on another node")
        response.headers.append(("Retry-After", "1"))
        return response
    server.metrics.messages_in.labels(kind, "http").inc()
    return admission, sub


# --------------------------------------------------------------------------- routes


async def route(server: RelayServer, reader: Any, method: str, target: bytes, body: bytes,
                headers: Sequence[tuple[bytes, bytes]], peer: str) -> tuple[str, Response | None]:
    """Answer one request to :data:`PATHS`; return the route name and the response.

    The response is None when the route wrote its own (an event stream, which uses the
    connection to its end).
    """
    path = urlsplit(target.decode("ascii", "replace")).path
    if path == CLIENT_JS_PATH:
        return "client_js", _client_js(method)
    name = path.lstrip("/")
    if method == "OPTIONS":
        return name, _cors(headers, _preflight(server, headers))
    if path == PUBLISH_PATH:
        if method != "POST":
            return name, _cors(headers, _not_allowed("POST"))
        return name, _cors(headers, await _publish(server, target, body, headers, peer))
    if method != "GET":
        return name, _cors(headers, _not_allowed("GET"))
    if path == POLL_PATH:
        return name, _cors(headers, await _poll(server, reader, target, headers, peer))
    response = await _sse(server, reader, target, headers, peer)
    return name, None if response is None else _cors(headers, response)


async def _publish(server: RelayServer, target: bytes, body: bytes, headers: Sequence[tuple[bytes, bytes]],
                   peer: str) -> Response:
    security = server.security
    refusal = security.check_origin(headers)
    if refusal is not None:
        server.metrics.handshakes_refused.labels("origin").inc()
        return refusal
    try:
        identity = security.authenticate(headers, target, time.time())
    except Unauthorized as exc:
        return _peer_error(exc)
    refusal = _limiters(server).admit(server, identity, peer, len(body))
    if refusal is not None:
        return refusal
    try:
        channel, obj = read_publish_body(body, server.config.max_channel_length)
        options = server.config.channel_options(channel)
        if not options.client_publish:
            raise Forbidden(f"clients may not publish to {channel!r}; its channel pattern "
                            f"{options.pattern!r} has client_publish = false")
        if not identity.permissions.may_publish(channel):
            raise Forbidden(f"your token does not allow publishing to {channel!r}")
        server.hub.check_publish(channel, obj["data"])
    except PeerError as exc:
        server.metrics.errors.labels(exc.code).inc()
        return _peer_error(exc)
    server.metrics.messages_in.labels("publish", "http").inc()
    try:
        result = await server.hub.publish_wait(channel, obj["data"], trio.current_time())
    except Unavailable as exc:  # Redis is down: 503, never a silent drop
        server.metrics.errors.labels(exc.code).inc()
        return error_response(503, exc.code, exc.message)
    server.metrics.published.labels("http_client").inc()
    return json_response(200, {"channel": channel, "offset": result.offset, "epoch": result.epoch})


async def _watch_peer(stream: trio.abc.Stream, reader: Any, gone: trio.CancelScope) -> None:
    """Cancel ``gone`` when the client closes its side (it sends nothing meanwhile)."""
    try:
        while True:
            data = await stream.receive_some(16384)
            if not data:
                break
            if reader.h11 is not None:
                reader.h11.receive_data(bytes(data))  # a pipelined request: h11 keeps it
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client is gone: that is what this task watches for
    gone.cancel()


def _is_news(msg: dict[str, Any]) -> bool:
    """Whether a poll answers at once for ``msg``: anything but the confirmation of a
    subscription that resumed where it was (a new one tells the client its position)."""
    return msg.get("type") != "subscribed" or msg.get("recovered") is not True


async def _poll(server: RelayServer, reader: Any, target: bytes,
                headers: Sequence[tuple[bytes, bytes]], peer: str) -> Response:
    admitted = _admit(server, "poll", target, headers, peer, _POLL_CODEC)
    if isinstance(admitted, Response):
        return admitted
    admission, sub = admitted
    query = parse_qs(urlsplit(target.decode("latin-1")).query, keep_blank_values=True)
    limit = server.config.poll_timeout
    try:
        wait = float(query["timeout"][-1]) if "timeout" in query else limit
        if not 0 <= wait < float("inf"):
            raise ValueError
    except ValueError:
        server.security.release(admission)
        return error_response(400, "bad_request", f"timeout must be a number of seconds >= 0, "
                                                  f"got {query['timeout'][-1][:32]!r}")
    wait = min(wait, limit)
    events: list[tuple[dict[str, Any], bytes, str | None]] = []
    server.add_connection(sub)  # type: ignore[arg-type]  # (a drain kicks it like a connection)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_peer, reader.stream, reader, nursery.cancel_scope)
            nursery.start_soon(sub.guard.watch_expiry, sub)
            sub.subscribe_all()
            deadline = trio.current_time() + wait
            while True:
                events += sub.take()
                if sub.closing is not None or any(_is_news(msg) for msg, _, _ in events):
                    break
                remaining = deadline - trio.current_time()
                if remaining <= 0:
                    break
                await sub.wait(remaining)
            nursery.cancel_scope.cancel()
    finally:
        server.hub.disconnect(sub, trio.current_time())
        server.remove_connection(sub)  # type: ignore[arg-type]
        server.security.release(admission)
    payloads = [payload for _, payload, _ in events]
    close = sub.close_event()
    if close is not None:
        payloads.append(dumps_json(close))
    since = [format_position(sub.positions[name]) for name in sub.channels]
    body = b'{"events":[' + b",".join(payloads) + b'],"since":' + dumps_json(since) + b"}\n"
    return Response(200, body, JSON_TYPE, [("Cache-Control", "no-store")])


_SSE_PING = b'event: ping\ndata: {"type":"ping"}\n\n'


def _sse_event(kind: str, payload: bytes, event_id: str | None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: ".encode() + payload + b"\n\n"


async def _sse(server: RelayServer, reader: Any, target: bytes,
               headers: Sequence[tuple[bytes, bytes]], peer: str) -> Response | None:
    admitted = _admit(server, "sse", target, headers, peer, _SSE_CODEC)
    if isinstance(admitted, Response):
        return admitted
    admission, sub = admitted
    stream: trio.abc.Stream = reader.stream
    conn: h11.Connection = reader.h11
    response_headers = [
        ("Content-Type", SSE_TYPE), ("Cache-Control", "no-store"), ("X-Accel-Buffering", "no"),
        ("Connection", "close"),
    ]
    origin = header(headers, b"origin")
    if origin is not None:
        response_headers += [("Access-Control-Allow-Origin", origin.decode("latin-1")), ("Vary", "Origin")]
    server.add_connection(sub)  # type: ignore[arg-type]
    log.info("event stream open", extra=logs.fields(event="open", conn=sub.id, remote=peer,
                                                  user=sub.guard.identity.user, encoding="sse"))
    try:
        head = conn.send(h11.Response(status_code=200, headers=response_headers))
        welcome = dumps_json({"type": "welcome", "session": sub.id, "node": server.node_id,
                              "heartbeat": server.config.heartbeat})
        head += conn.send(h11.Data(data=f"retry: {SSE_RETRY_MS}\n\n".encode() + _sse_event("welcome", welcome, None)))
        with trio.CancelScope() as gone:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_peer, stream, reader, gone)
                nursery.start_soon(sub.guard.watch_expiry, sub)
                await stream.send_all(head)
                sub.subscribe_all()
                await _sse_writer(server, sub, stream, conn)
                nursery.cancel_scope.cancel()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away mid-write: nothing more to send
    finally:
        server.hub.disconnect(sub, trio.current_time())
        server.remove_connection(sub)  # type: ignore[arg-type]
        server.security.release(admission)
        log.info("event stream closed", extra=logs.fields(
            event="close", conn=sub.id, remote=peer, duration_s=round(time.time() - sub.started_at, 3),
            code=sub.closing[0] if sub.closing else None))
    return None


async def _sse_writer(server: RelayServer, sub: _Subscriber, stream: trio.abc.Stream,
                      conn: h11.Connection) -> None:
    """Write queued events as SSE until kicked; a ``ping`` event after ``heartbeat`` seconds
    of silence keeps proxies from closing the stream and lets the client see it is alive."""
    heartbeat = server.config.heartbeat
    while True:
        await sub.wait(heartbeat)
        chunk = b"".join(_sse_event(msg["type"], payload, event_id) for msg, payload, event_id in sub.take())
        close = sub.close_event()
        if close is not None:
            chunk += _sse_event("close", dumps_json(close), None)
        if not chunk:
            chunk = _SSE_PING  # (an event, not a comment: EventSource shows pages no comments)
        with trio.CancelScope() as scope:
            sub.send_scope = scope
            if sub.closing is not None:
                scope.deadline = trio.current_time() + CLOSE_GRACE_SECONDS
            await stream.send_all(conn.send(h11.Data(data=chunk)))
            server.bytes_sent += len(chunk)
            sub.outbox.written()
            if close is not None:
                await stream.send_all(conn.send(h11.EndOfMessage()))
        sub.send_scope = None
        if close is not None or scope.cancelled_caught:
            return


__all__ = ["PATHS", "format_position", "handles", "parse_position", "route"]
