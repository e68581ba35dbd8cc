"""A small trio-native Redis client: pipelined commands and pub/sub, on hiredis' parser.

Replies are parsed by ``hiredis.Reader`` (sans-IO) and commands encoded by
``hiredis.pack_command``; this module owns only the sockets and the bookkeeping: a
:class:`Pipeline` writes every command queued during one scheduling pass in one
``send`` and matches replies to callbacks in order (Redis answers in order), and a
:class:`PubSub` sends (S)SUBSCRIBE / (S)UNSUBSCRIBE and hands each published message to
a callback. Connection URLs are parsed by redis-py (``redis.connection.parse_url``), so
``redis://``, ``rediss://``, a user, a password and a database number mean what they
mean to every other Redis client (``redis+sentinel://`` URLs, which redis-py does not
parse, by :func:`relay.config.parse_sentinel_url`).

It never reconnects by itself: the owner (:class:`relay.broker.shard.Shard`) runs
:meth:`Pipeline.run` / :meth:`PubSub.run`, and when either returns with an error, opens
new ones. Every buffer here is bounded by the caller's ``max_pending``.
"""

from __future__ import annotations

import logging
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import quote

import hiredis
import trio

from ..config import parse_sentinel_url, redact_url
from ..errors import Unavailable

log = logging.getLogger("relay.broker")

#: How long opening a connection (TCP, TLS, AUTH, SELECT) may take.
CONNECT_TIMEOUT_SECONDS = 2.0
#: Bytes asked for per read.
READ_BYTES = 262144

Reply = Any
Callback = Callable[[Reply], None]


class ConnectionLost(Exception):
    """The Redis connection closed or broke; the owner reconnects."""


@dataclass(frozen=True)
class Endpoint:
    """Where one Redis server is and how to log in, parsed from its URL."""

    url: str
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool
    #: With a ``redis+sentinel://`` URL: the master's name and the Sentinels that know where
    #: it is (``host`` and ``port`` are then the first Sentinel's, not the master's).
    master: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    #: The Sentinels' own user and password (None: they take no login).
    sentinel_login: tuple[str | None, str | None] = (None, None)

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        if url.startswith(("redis+sentinel://", "rediss+sentinel://")):
            sentinel = parse_sentinel_url(url)
            host, port = sentinel.sentinels[0]
            return cls(url, host, port, sentinel.db, sentinel.username, sentinel.password, sentinel.tls,
                       sentinel.master, sentinel.sentinels, (sentinel.sentinel_username, sentinel.sentinel_password))
        # (imported here: the test suite's own "redis" package shadows redis-py in-process)
        from redis.connection import parse_url

        opts = parse_url(url)  # type: ignore[no-untyped-call]
        return cls(
            url=url,
            host=opts.get("host", "localhost"),
            port=int(opts.get("port", 6379)),
            db=int(opts.get("db", 0)),
            username=opts.get("username"),
            password=opts.get("password"),
            tls=url.startswith("rediss://"),
        )

    def moved_to(self, host: str, port: int, db: int = 0, *, sentinel: bool = False) -> Endpoint:
        """Another server with the same login: a Redis Cluster master (database 0), the master
        a Sentinel named, or (``sentinel=True``, with the Sentinels' login) a Sentinel."""
        scheme = "rediss" if self.tls else "redis"
        username, password = self.sentinel_login if sentinel else (self.username, self.password)
        auth = ""
        if password is not None:
            auth = f"{quote(username or '', safe='')}:{quote(password, safe='')}@"
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        path = f"/{db}" if db else ""
        return Endpoint(f"{scheme}://{auth}{netloc}{path}", host, port, db, username, password, self.tls)

    @property
    def shown(self) -> str:
        """The URL with its password masked (for logs, errors and /readyz)."""
        return redact_url(self.url)

    @property
    def identity(self) -> str:
        """What names this server on the hash ring: host, port and database (no password),
        or for a master found through Sentinels its name and database."""
        if self.master is not None:
            return f"sentinel:{self.master}/{self.db}"
        return f"{self.host}:{self.port}/{self.db}"


class Link:
    """One Redis connection: its stream and its reply parser."""

    def __init__(self, stream: trio.abc.Stream, endpoint: Endpoint) -> None:
        self.stream = stream
        self.endpoint = endpoint
        self.reader = hiredis.Reader()

    @classmethod
    async def open(cls, endpoint: Endpoint, name: str) -> Link:
        """Connect, log in, select the database and name the connection.

        Raises:
            OSError, trio.TooSlowError, ConnectionLost: the server cannot be reached or
                refused the login (the message says which).
        """
        with trio.fail_after(CONNECT_TIMEOUT_SECONDS):
            stream: trio.abc.Stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
            try:
                if endpoint.tls:
                    ctx = ssl.create_default_context()
                    stream = trio.SSLStream(stream, ctx, server_hostname=endpoint.host)
                    try:
                        await stream.do_handshake()
                    except trio.BrokenResourceError as exc:
                        reason = exc.__cause__ or exc
                        raise ConnectionLost(f"TLS handshake failed: {reason}") from None
                link = cls(stream, endpoint)
                if endpoint.password is not None:
                    auth = ("AUTH", endpoint.username, endpoint.password) if endpoint.username else (
                        "AUTH", endpoint.password)
                    await link.call(auth)
                if endpoint.db:
                    await link.call(("SELECT", endpoint.db))
                await link.call(("CLIENT", "SETNAME", name))
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        return link

    async def call(self, args: Sequence[Any]) -> Reply:
        """Send one command and wait for its reply (only while nothing else uses the link)."""
        await self.stream.send_all(hiredis.pack_command(tuple(args)))
        while True:
            replies = await self.read()
            if replies:
                reply = replies[0]
                if isinstance(reply, hiredis.ReplyError):
                    raise ConnectionLost(f"{args[0]} failed: {reply}")
                return reply

    async def read(self) -> list[Reply]:
        """Read once from the socket and return every reply that is now complete."""
        try:
            data = await self.stream.receive_some(READ_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"connection broke: {exc}") from None
        if not data:
            raise ConnectionLost("the server closed the connection")
        reader = self.reader
        reader.feed(data if isinstance(data, bytes) else bytes(data))
        replies = []
        while (reply := reader.gets()) is not False:
            replies.append(reply)
        return replies

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"connection broke: {exc}") from None

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class _Writer:
    """Commands waiting to be written: all that were queued in a pass leave in one send."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self._lot = trio.lowlevel.ParkingLot()

    def push(self, data: bytes) -> None:
        self.out.append(data)
        if len(self.out) == 1:
            self._lot.unpark_all()

    async def run(self, link: Link) -> None:
        out = self.out
        while True:
            while not out:
                await self._lot.park()
            data = b"".join(out)
            out.clear()
            await link.send(data)


class Pipeline:
    """Commands on one connection, pipelined: callbacks get the replies in order.

    A callback gets the reply (bytes, int, list, ``hiredis.ReplyError``) or, when the
    connection is lost before the reply came, an :class:`~relay.errors.Unavailable`.
    """

    def __init__(self, link: Link, max_pending: int) -> None:
        self.link = link
        self.max_pending = max_pending
        self.closed: str | None = None
        self._writer = _Writer()
        self._waiting: deque[Callback] = deque()

    @property
    def pending(self) -> int:
        return len(self._waiting)

    def submit(self, args: Sequence[Any], callback: Callback) -> None:
        """Queue one command; ``callback`` gets its reply later.

        Raises:
            Unavailable: the connection is closed, or ``max_pending`` commands already
                wait for replies (Redis is too slow for this load).
        """
        if self.closed is not None:
            raise Unavailable(f"redis {self.link.endpoint.shown} unavailable: {self.closed}")
        if len(self._waiting) >= self.max_pending:
            raise Unavailable(
                f"redis {self.link.endpoint.shown} overloaded: {len(self._waiting)} commands "
                f"wait for replies (limit {self.max_pending})")
        self._writer.push(hiredis.pack_command(tuple(args)))
        self._waiting.append(callback)

    async def call(self, *args: Any) -> Reply:
        """Send one command and return its reply.

        Raises:
            Unavailable: the connection is closed or was lost before the reply.
            hiredis.ReplyError: Redis answered with an error.

        If cancelled, the command may still run; its reply is discarded.
        """
        done = trio.Event()
        box: list[Reply] = []

        def settle(reply: Reply) -> None:
            box.append(reply)
            done.set()

        self.submit(args, settle)
        await done.wait()
        reply = box[0]
        if isinstance(reply, (Unavailable, hiredis.ReplyError)):
            raise reply
        return reply

    async def run(self) -> None:
        """Write and read until the connection is lost (raises :class:`ConnectionLost`).

        Every callback still waiting then gets :class:`~relay.errors.Unavailable`.
        """
        try:
            await _read_and_write(self.link, self._writer, self._read)
        except ConnectionLost as exc:
            self.close(str(exc))
            raise
        finally:
            self.close("connection closed")

    async def _read(self) -> None:
        waiting = self._waiting
        while True:
            for reply in await self.link.read():
                if not waiting:
                    raise ConnectionLost(f"reply without a command: {reply!r:.80}")
                _settle(waiting.popleft(), reply)

    def close(self, reason: str) -> None:
        """Refuse new commands and fail the waiting ones with ``reason``."""
        if self.closed is None:
            self.closed = reason
        error = Unavailable(f"redis {self.link.endpoint.shown} unavailable: {reason}")
        waiting = self._waiting
        while waiting:
            _settle(waiting.popleft(), error)


async def _read_and_write(link: Link, writer: _Writer, read: Callable[[], Any]) -> None:
    """Run ``writer`` and ``read`` until either loses the connection; raise that
    :class:`ConnectionLost` itself (not wrapped in an exception group)."""
    lost: list[ConnectionLost] = []

    async def guarded(fn: Callable[[], Any], scope: trio.CancelScope) -> None:
        try:
            await fn()
        except ConnectionLost as exc:
            lost.append(exc)
        finally:
            scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guarded, partial(writer.run, link), nursery.cancel_scope)
        await guarded(read, nursery.cancel_scope)
    if lost:
        raise lost[0]
    raise ConnectionLost("connection closed")


def _settle(callback: Callback, reply: Reply) -> None:
    try:
        callback(reply)
    except Exception:
        # A callback is relay's own code answering one request; its bug must not take the
        # connection (and every other request on it) down. Logged with the traceback.
        log.exception("redis reply callback failed")


class PubSub:
    """A subscriber connection: (S)SUBSCRIBE and (S)UNSUBSCRIBE, and published messages.

    ``on_message(key, payload)`` is called for every message, in the order Redis sent
    them. :meth:`subscribe` returns one event per key, set when Redis confirmed that
    subscription (confirmations come in the order the subscriptions were sent).
    """

    def __init__(self, link: Link, on_message: Callable[[bytes, bytes], None], *, sharded: bool = False) -> None:
        self.link = link
        self.on_message = on_message
        self.sharded = sharded
        self.pongs = 0
        self._pong = trio.Event()
        self._writer = _Writer()
        self._acks: dict[bytes, deque[trio.Event]] = {}

    def subscribe(self, keys: Sequence[bytes]) -> list[trio.Event]:
        events = []
        for key in keys:
            event = trio.Event()
            self._acks.setdefault(key, deque()).append(event)
            events.append(event)
        command: tuple[Any, ...] = ("SSUBSCRIBE" if self.sharded else "SUBSCRIBE", *keys)
        self._writer.push(hiredis.pack_command(command))
        return events

    def unsubscribe(self, keys: Sequence[bytes]) -> None:
        command: tuple[Any, ...] = ("SUNSUBSCRIBE" if self.sharded else "UNSUBSCRIBE", *keys)
        self._writer.push(hiredis.pack_command(command))

    def ping(self) -> trio.Event:
        """Send PING; the event is set when its answer (or any later pong) arrives."""
        if self._pong.is_set():
            self._pong = trio.Event()
        self._writer.push(hiredis.pack_command(("PING",)))
        return self._pong

    async def run(self) -> None:
        """Write and read until the connection is lost (raises :class:`ConnectionLost`)."""
        await _read_and_write(self.link, self._writer, self._read)

    async def _read(self) -> None:
        on_message, acks = self.on_message, self._acks
        while True:
            for reply in await self.link.read():
                if isinstance(reply, list) and len(reply) >= 3:
                    kind = reply[0]
                    if kind == b"message" or kind == b"smessage":
                        on_message(reply[1], reply[2])
                    elif kind == b"subscribe" or kind == b"ssubscribe":
                        waiting = acks.get(reply[1])
                        if waiting:
                            waiting.popleft().set()
                            if not waiting:
                                del acks[reply[1]]
                    # unsubscribe confirmations need nothing
                elif isinstance(reply, list) and reply and reply[0] == b"pong" or reply == b"PONG":
                    self.pongs += 1
                    self._pong.set()
                elif isinstance(reply, hiredis.ReplyError):
                    raise ConnectionLost(f"pub/sub error: {reply}")
