"""Stream integrity: whatever happens, every byte the server writes on a WebSocket connection
belongs to exactly one whole, valid frame, and nothing follows a close frame.

The server writes a connection's bytes from several places: a direct non-blocking ``send``
once per batch of input (the flusher), its writer task (``Connection._write``: what a
direct send could not write, then the rest of the outbox), and trio-websocket itself
(pongs to the client's pings, the server's heartbeat pings, close frames). These tests
force the interesting case, writes the kernel takes only part of, while control
frames and closes happen, and read the stream with :class:`StrictClient`: a raw socket
client with its own frame parser that fails the test on any deviation from RFC 6455 and
from the relay protocol (see the class docstring).

Partial writes are forced by shrinking both ends: the client's receive buffer (before
connect, so the advertised window stays small) and the server's send buffer for that one
connection (``SO_SNDBUF`` on the accepted socket). The client then reads in small chunks
with pauses. Every test checks (:class:`Probe`) that direct sends really were cut short
inside a frame and that a later write finished them.

The strict client runs in the server's trio loop, over real loopback sockets; it speaks
only the wire protocol, except where a test reaches into the server on purpose (the
probe, :class:`ArriveWhileHandling`, and ``Connection.kick``).
"""

from __future__ import annotations

import codecs
import collections
import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
import trio_websocket
from websockets.exceptions import ConnectionClosed as WebsocketsClosed
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState

from relay import fastpath
from relay.core.codec import JSON, MSGPACK, Codec
from relay.server.app import RelayServer
from relay.server.ws import Connection

from .conftest import JSON_PROTO, MSGPACK_PROTO, Client, http_post_json, open_client, running_server
from .test_bad_input import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawSocket

KNOWN_OPCODES = {OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG}
SERVER_MESSAGE_TYPES = {"welcome", "subscribed", "unsubscribed", "message", "poke", "ack", "pong",
                        "refreshed", "gap", "error"}
# Close codes a server may send (RFC 6455 7.4: never 1004, 1005, 1006 or 1015 on the wire).
VALID_CLOSE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
#: A frame longer than this is certainly a misparse (the tests never publish that much).
MAX_SANE_FRAME = 4 * 1024 * 1024

#: Shrinks the window the server may send into (set on the client before connect).
CLIENT_RCVBUF = 4096
#: Asked for on the server's accepted socket (Linux doubles it, minimum ~4.6 KiB).
SERVER_SNDBUF = 4096

#: Limits for the "no slow-consumer trip" tests: a queue far larger than what is published.
BIG = {"max_message_size": 256 * 1024, "send_queue_size": 32 * 1024 * 1024}
#: Frame payload lengths around every header-size boundary of RFC 6455 (7-bit, 16-bit, 64-bit).
BOUNDARY_LENGTHS = (100, 125, 126, 127, 200, 1000, 4095, 4096, 16000, 65535, 65536, 65537, 100_000)

ENCODINGS = ["json", "msgpack"]


class StreamViolation(AssertionError):
    """The server wrote something a strict client must reject."""


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One whole client frame (masked, as RFC 6455 requires of clients)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 0x10000:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    key = os.urandom(4)
    if not n:
        return head + key
    stream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return head + key + masked


SERVER_FRAME_FIRST_BYTES = {0x80 | op for op in KNOWN_OPCODES}


def whole_frames(data: bytes) -> bool:
    """True when ``data`` is a run of whole server frames (starts and ends on a boundary).

    Server frames start with FIN set, RSV clear and a known opcode, and are unmasked; a
    run that starts inside a frame (in JSON text or a msgpack payload) fails this at
    once or ends off the boundary.
    """
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 2 or data[pos] not in SERVER_FRAME_FIRST_BYTES or data[pos + 1] & 0x80:
            return False
        n, head = data[pos + 1] & 0x7F, 2
        if n == 126:
            if end - pos < 4:
                return False
            n, head = struct.unpack_from("!H", data, pos + 2)[0], 4
        elif n == 127:
            if end - pos < 10:
                return False
            n, head = struct.unpack_from("!Q", data, pos + 2)[0], 10
        pos += head + n
    return pos == end


# --------------------------------------------------------------------------- server-side probes

class Probe:
    """Proves that a test exercised partial writes, whatever the server's write design.

    A connection's bytes leave either by a direct non-blocking send (the flusher, on the
    kernel socket) or through the WebSocket's stream (``ws._stream.send_all``: the writer
    task, and trio-websocket's pings, pongs and close frames). Writes through the stream
    are whole frames, except the one that finishes what a direct send could not write:
    it starts inside a frame. The probe spies on a connection's stream and counts those.
    """

    def __init__(self) -> None:
        self.writes: collections.Counter[str] = collections.Counter()
        self.finished_partial: collections.Counter[str] = collections.Counter()

    def squeeze(self, conn: Connection) -> None:
        """Shrink ``conn``'s server-side socket send buffer (Linux: to its ~4.6 KiB
        minimum) and spy on the writes through its stream."""
        stream = conn.ws._stream
        sock = stream.socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SERVER_SNDBUF)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) <= 4 * SERVER_SNDBUF
        send_all = stream.send_all
        probe, conn_id = self, conn.id

        async def spying_send_all(data: bytes | bytearray | memoryview) -> None:
            probe.writes[conn_id] += 1
            if not whole_frames(bytes(data)):
                probe.finished_partial[conn_id] += 1
            await send_all(data)

        stream.send_all = spying_send_all

    def assert_partial_writes(self, *conn_ids: str) -> None:
        """The interesting path ran: a direct send was cut inside a frame and a write
        through the stream finished it (for one of ``conn_ids`` at least)."""
        finished = sum(self.finished_partial[c] for c in conn_ids)
        assert finished >= 1, (
            f"no write through the stream started inside a frame (writes: "
            f"{sum(self.writes[c] for c in conn_ids)}): no direct send was cut short, so the "
            "test did not exercise partial writes")


@pytest.fixture
def probe() -> Probe:
    return Probe()


# --------------------------------------------------------------------------- the strict client

class StrictClient:
    """A raw WebSocket client that validates every byte the server sends.

    Frames: FIN set (the server never fragments), RSV bits 0, no mask bit, a known opcode
    (no continuation frames), minimal length encoding, control frames at most 125 bytes.
    Payloads: text frames only on JSON connections and valid UTF-8 JSON objects; binary
    frames only on msgpack connections and one msgpack map; every message has a known
    ``type``; a close frame is a valid code plus a UTF-8 reason; nothing at all follows it.
    Semantics: ``message`` offsets per channel follow ``subscribed``'s offset one by one;
    data carry their offset; pongs answer the client's pings in order with the same
    payload; protocol ``pong``/``ack``/``error`` answers come back in request order.

    It reads in small chunks (``read_sizes``) with pauses (``pause_probability``,
    ``pause``), answers the server's pings with masked pongs, and records what it saw.
    Any violation raises :class:`StreamViolation` from the reader task, which fails the
    test.
    """

    def __init__(self, raw: RawSocket, encoding: str, *, seed: int = 0) -> None:
        self.stream = raw.stream
        self.buf = bytearray(raw.buf)  # whatever followed the 101 response already
        self.encoding = encoding
        self.codec: Codec = MSGPACK if encoding == "msgpack" else JSON
        self.rng = random.Random(seed)
        self.read_sizes: tuple[int, ...] = (256, 1024, 1500, 4096, 8192)
        self.pause_probability = 0.15
        self.pause = 0.001
        self.position = 0  # stream offset of buf[0]
        # Every write goes through one sender task, so the reader never waits to write (a
        # client that stops reading until its write completes can deadlock with a server
        # that stops reading until its pong is written).
        self._outgoing, self._to_send = trio.open_memory_channel[bytes](float("inf"))
        # what the client asked for, in order
        self.pings_out: collections.deque[bytes] = collections.deque()
        self.refs_out: collections.deque[tuple[str, Any]] = collections.deque()  # (expected type, ref)
        # what it saw
        self.frames = 0
        self.messages: list[dict[str, Any]] = []
        self.last_offset: dict[str, int] = {}
        self.data_lengths: set[int] = set()
        self.header_forms: collections.Counter[int] = collections.Counter()  # 7 / 16 / 64 bit lengths
        self.server_pings = 0
        self.pongs = 0
        self.answers: collections.Counter[str] = collections.Counter()
        self.close: tuple[int, str] | None = None
        self.close_sent = False
        self.end: str | None = None  # "eof" or "reset" once the server ended TCP
        self.truncated = b""  # an unfinished frame when TCP ended
        self.own_published = 0  # publishes to the client's own channel "own"
        self.own_base = 0  # the offset of "own" when the first of them went out
        self.ping_when_closed = False  # send a ping right before answering the server's close
        self.done = trio.Event()
        self._waiters: list[tuple[Callable[[], bool], trio.Event]] = []

    # -- opening -------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(cls, server: RelayServer, encoding: str = "json", *,
                      rcvbuf: int | None = CLIENT_RCVBUF, seed: int = 0) -> AsyncIterator[StrictClient]:
        raw = await RawSocket.open(server.port, rcvbuf=rcvbuf)
        try:
            protocols = (MSGPACK_PROTO,) if encoding == "msgpack" else (JSON_PROTO,)
            response = await raw.handshake(subprotocols=protocols)
            assert response.headers.get("sec-websocket-protocol") == protocols[0], response
            client = cls(raw, encoding, seed=seed)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.run)
                nursery.start_soon(client._sender)
                welcome = await client.wait_message(lambda m: True)
                assert welcome["type"] == "welcome" and client.messages == [welcome], welcome
                client.welcome = welcome
                yield client
                nursery.cancel_scope.cancel()
        finally:
            await raw.aclose()

    welcome: dict[str, Any]

    # -- reading -------------------------------------------------------------------------

    def violation(self, what: str, at: int | None = None) -> StreamViolation:
        where = self.position if at is None else at
        return StreamViolation(f"byte {where} of the stream (frame #{self.frames + 1}): {what}; "
                               f"next bytes {bytes(self.buf[:16]).hex(' ')}")

    async def _fill(self) -> bool:
        if self.end is not None:
            return False
        if self.pause_probability and self.rng.random() < self.pause_probability:
            await trio.sleep(self.pause)
        try:
            data = await self.stream.receive_some(self.rng.choice(self.read_sizes))
        except trio.BrokenResourceError:
            self.end = "reset"
            return False
        if not data:
            self.end = "eof"
            return False
        self.buf += data
        return True

    async def _need(self, n: int) -> bool:
        while len(self.buf) < n:
            if not await self._fill():
                return False
        return True

    async def _next_frame(self) -> tuple[int, bytes] | None:
        """Return the next (opcode, payload), or None when TCP ended (maybe inside a frame)."""
        if not await self._need(2):
            self.truncated = bytes(self.buf)
            return None
        b0, b1 = self.buf[0], self.buf[1]
        opcode = b0 & 0x0F
        if b0 & 0x70:
            raise self.violation(f"RSV bits set ({b0:#04x})")
        if opcode not in KNOWN_OPCODES:
            note = " (continuation: the server never fragments)" if opcode == OP_CONT else ""
            raise self.violation(f"unknown or unexpected opcode {opcode:#x}{note}")
        if not b0 & 0x80:
            raise self.violation("FIN not set: the server must not fragment")
        if b1 & 0x80:
            raise self.violation("mask bit set on a server frame")
        n, head = b1 & 0x7F, 2
        if n == 126:
            if not await self._need(4):
                self.truncated = bytes(self.buf)
                return None
            n, head = struct.unpack_from("!H", self.buf, 2)[0], 4
            if n < 126:
                raise self.violation(f"16-bit length {n} that fits in 7 bits")
        elif n == 127:
            if not await self._need(10):
                self.truncated = bytes(self.buf)
                return None
            n, head = struct.unpack_from("!Q", self.buf, 2)[0], 10
            if n < 0x10000 or n >> 63:
                raise self.violation(f"64-bit length {n}: fits in 16 bits, or its top bit is set")
        if opcode >= 0x8 and n > 125:
            raise self.violation(f"control frame {opcode:#x} with a {n}-byte payload")
        if n > MAX_SANE_FRAME:
            raise self.violation(f"frame length {n}: a misparse")
        if not await self._need(head + n):
            self.truncated = bytes(self.buf)
            return None
        payload = bytes(self.buf[head:head + n])
        del self.buf[:head + n]
        self.position += head + n
        self.frames += 1
        if opcode < 0x8:
            self.header_forms[{2: 7, 4: 16, 10: 64}[head]] += 1
        return opcode, payload

    async def run(self) -> None:
        try:
            while (frame := await self._next_frame()) is not None:
                opcode, payload = frame
                if opcode == OP_CLOSE:
                    self._on_close(payload)
                    await self._after_close()
                    return
                await self._on_frame(opcode, payload)
                self._notify()
        finally:
            self.done.set()
            self._notify()

    async def _on_frame(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self.server_pings += 1
            self.enqueue(masked_frame(OP_PONG, payload))
            return
        if opcode == OP_PONG:
            if not self.pings_out:
                raise self.violation(f"unsolicited pong {payload!r}")
            expected = self.pings_out.popleft()
            if payload != expected:
                raise self.violation(f"pong {payload!r} does not answer the oldest ping {expected!r}")
            self.pongs += 1
            return
        if opcode == OP_TEXT:
            if self.encoding != "json":
                raise self.violation("text frame on a msgpack connection")
            try:
                msg = json.loads(payload.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise self.violation(f"text frame that is not UTF-8 JSON: {str(exc)[-160:]}") from None
        else:
            if self.encoding != "msgpack":
                raise self.violation("binary frame on a JSON connection")
            try:
                msg = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            except Exception as exc:
                raise self.violation(
                    f"binary frame that is not one msgpack value: {str(exc)[-160:]}") from None
        if not isinstance(msg, dict) or msg.get("type") not in SERVER_MESSAGE_TYPES:
            raise self.violation(f"not a relay message: {str(msg)[:200]}")
        self._on_message(msg, len(payload))

    def _on_message(self, msg: dict[str, Any], length: int) -> None:
        kind = msg["type"]
        if (kind == "welcome") != (not self.messages):
            raise self.violation(f"{kind} as message #{len(self.messages) + 1}: welcome comes first, once")
        if kind != "message":
            self.messages.append(msg)
        if kind == "message":
            self._on_publication(msg, length)
        elif kind in ("subscribed", "pong", "ack", "error", "unsubscribed"):
            if not self.refs_out:
                raise self.violation(f"unsolicited {kind}: {msg}")
            expected_kind, ref = self.refs_out.popleft()
            if (kind, msg.get("ref")) != (expected_kind, ref):
                raise self.violation(
                    f"got {kind} ref={msg.get('ref')!r}, expected {expected_kind} ref={ref!r}: {msg}")
            self.answers[kind] += 1
            if kind == "subscribed":
                self.last_offset[msg["channel"]] = msg["offset"]
            elif kind == "ack" and not (isinstance(msg.get("offset"), int)
                                        and isinstance(msg.get("epoch"), str)):
                raise self.violation(f"ack without offset and epoch: {msg}")
            elif kind == "error" and not (isinstance(msg.get("code"), str) and msg.get("message")):
                raise self.violation(f"error without code and message: {msg}")
        elif kind == "gap":
            raise self.violation(f"gap on a stream channel: {msg}")

    def _on_publication(self, msg: dict[str, Any], length: int) -> None:
        channel, offset = msg["channel"], msg["offset"]
        if channel not in self.last_offset:
            raise self.violation(f"message on {channel!r} before subscribed")
        if offset != self.last_offset[channel] + 1:
            raise self.violation(f"{channel!r}: offset {offset} after {self.last_offset[channel]}")
        self.last_offset[channel] = offset
        data = msg["data"]
        if isinstance(data, str) and not data.startswith(f"{offset}|"):
            raise self.violation(f"{channel!r} offset {offset} carries data of another offset: {data[:40]!r}")
        self.data_lengths.add(length)
        self.messages.append({"type": "message", "channel": channel, "offset": offset})

    def _on_close(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise self.violation(f"close frame without a code: {payload!r}")
        code = struct.unpack("!H", payload[:2])[0]
        if code not in VALID_CLOSE_CODES and not 3000 <= code <= 4999:
            raise self.violation(f"close code {code} may not be sent")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise self.violation(f"close reason is not UTF-8: {payload[2:]!r}") from None
        self.close = (code, reason)

    async def _after_close(self) -> None:
        """Answer the close (unless we started it), then expect nothing but the end of TCP."""
        if self.buf:
            raise self.violation("bytes after the close frame")
        assert self.close is not None
        ping = masked_frame(OP_PING, b"crossing") if self.ping_when_closed else b""
        self.enqueue(ping + masked_frame(OP_CLOSE, struct.pack("!H", self.close[0])), closing=True)
        while await self._fill():
            raise self.violation("bytes after the close frame")

    # -- waiting -------------------------------------------------------------------------

    def _notify(self) -> None:
        still = []
        for pred, event in self._waiters:
            if self.done.is_set() or pred():
                event.set()
            else:
                still.append((pred, event))
        self._waiters = still

    async def wait_for(self, pred: Callable[[], bool], what: str = "") -> None:
        while not pred():
            if self.done.is_set():
                raise AssertionError(
                    f"the connection ended ({self.end}, close={self.close}, {len(self.truncated)} "
                    f"bytes of an unfinished frame: {self.truncated[:24].hex(' ')}, offsets "
                    f"{self.last_offset}) while waiting for {what or pred}")
            event = trio.Event()
            self._waiters.append((pred, event))
            await event.wait()

    async def wait_message(self, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        start = len(self.messages)
        found: list[dict[str, Any]] = []

        def check() -> bool:
            for m in self.messages[start:]:
                if pred(m):
                    found.append(m)
                    return True
            return False

        await self.wait_for(check, "a message")
        return found[0]

    def idle(self) -> bool:
        """Every ping, protocol ping and request has been answered."""
        return not self.pings_out and not self.refs_out

    # -- writing -------------------------------------------------------------------------

    def encode(self, message: dict[str, Any]) -> bytes:
        if self.encoding == "msgpack":
            return masked_frame(OP_BINARY, msgpack.packb(message, use_bin_type=True))
        return masked_frame(OP_TEXT, json.dumps(message).encode())

    def enqueue(self, data: bytes, *, expect: tuple[tuple[str, Any], ...] = (),
                pings: tuple[bytes, ...] = (), closing: bool = False) -> bool:
        """Queue bytes (one or more frames) to go out in one write, noting the answers they
        ask for; False (nothing queued) once the client sent its close frame."""
        if self.close_sent:
            return False
        self.refs_out.extend(expect)
        self.pings_out.extend(pings)
        self.close_sent = closing
        self._outgoing.send_nowait(data)
        return True

    def note(self, *, expect: tuple[tuple[str, Any], ...] = (), pings: tuple[bytes, ...] = (),
             closing: bool = False) -> None:
        """Note answers asked for by bytes sent some other way (:class:`ArriveWhileHandling`)."""
        assert not self.close_sent
        self.refs_out.extend(expect)
        self.pings_out.extend(pings)
        self.close_sent = closing

    def describe_truncation(self) -> str:
        """Say how TCP ended inside a frame, and whether the bytes so far can be the start
        of that frame (a clean drop) or not (something was written into it)."""
        data = self.truncated
        what = f"TCP ended ({self.end}) inside a frame, {len(data)} bytes of it: {data[:12].hex(' ')}"
        if len(data) > 4 and data[0] == 0x80 | OP_TEXT:
            head = {126: 4, 127: 10}.get(data[1] & 0x7F, 2)
            try:
                codecs.getincrementaldecoder("utf-8")().decode(data[head:], final=False)
            except UnicodeDecodeError as exc:
                bad = data[head + exc.start:head + exc.start + 8].hex(" ")
                return what + f"; not UTF-8 at payload byte {exc.start}: {bad}"
        return what

    async def _sender(self) -> None:
        async for data in self._to_send:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the server is gone; the reader sees how

    async def send_raw(self, data: bytes, **kwargs: Any) -> None:
        self.enqueue(data, **kwargs)
        await trio.lowlevel.checkpoint()

    async def request(self, message: dict[str, Any], answer: str) -> None:
        await self.send_raw(self.encode(message), expect=((answer, message.get("ref")),))

    async def ping(self, payload: bytes) -> None:
        await self.send_raw(masked_frame(OP_PING, payload), pings=(payload,))

    async def publish_own(self, ref: str, size: int) -> None:
        """Publish ``size`` characters to the client's own channel ``own`` (subscribed
        first), asking for an ack; the server sends the client a message and the ack."""
        if self.own_published == 0:
            self.own_base = self.last_offset["own"]
        frame = self.encode({"type": "publish", "channel": "own", "ref": ref,
                             "data": f"{self.own_base + self.own_published + 1}|".ljust(size, "o")})
        if self.enqueue(frame, expect=(("ack", ref),)):
            self.own_published += 1
        await trio.lowlevel.checkpoint()

    async def subscribe(self, *channels: str) -> None:
        for channel in channels:
            await self.request({"type": "subscribe", "channel": channel, "ref": f"sub-{channel}"},
                               "subscribed")
        await self.wait_for(lambda: all(c in self.last_offset for c in channels), "subscribed")

    async def send_close(self, code: int = 1000) -> None:
        await self.send_raw(masked_frame(OP_CLOSE, struct.pack("!H", code) + b"bye"), closing=True)

    async def chatter(self, stop: trio.Event, *, big_every: int = 0) -> None:
        """Until ``stop``: WebSocket pings, protocol pings, a bad request now and then, and
        publishes to the client's own channel ``own`` (some large) with acks."""
        i = 0
        while not stop.is_set() and not self.close_sent and not self.done.is_set():
            i += 1
            await self.ping(b"c%d" % i if i % 7 else (b"%d|" % i).ljust(125, b"p"))
            await self.request({"type": "ping", "ref": i}, "pong")
            if i % 5 == 0:
                await self.request({"type": "bogus", "ref": f"e{i}"}, "error")
            if i % 3 == 0:
                # a large one only once the previous one came back, so they do not pile up
                big = (big_every and i % big_every == 0
                       and self.last_offset["own"] == self.own_base + self.own_published)
                await self.publish_own(f"a{i}", 70_000 if big else 300)
            await trio.sleep(0.002)


# --------------------------------------------------------------------------- publishing helpers

def data_of_length(codec: Codec, channel: str, offset: int, length: int) -> str:
    """Data (a string starting with ``"{offset}|"``, with some multi-byte characters) whose
    ``message`` payload is ``length`` bytes in ``codec``, or as near as it gets."""

    def size(data: str) -> int:
        # (``ts`` is always 16 digits: unix microseconds until the year 2286.)
        return len(codec.encode({"type": "message", "channel": channel, "offset": offset, "data": data,
                                 "ts": 1_000_000_000_000_000}))

    head = f"{offset}|" + "€ü" * min(8, max(0, (length - 90) // 40))
    pad = max(0, length - size(head))
    for _ in range(6):
        got = size(head + "x" * pad)
        if got == length or pad + length - got < 0:
            break
        pad += length - got
    return head + "x" * pad


def lengths_plan(n: int) -> list[int]:
    """Payload lengths for offsets 1..n: every boundary length, between runs of small ones."""
    plan = []
    boundary = list(BOUNDARY_LENGTHS)
    for i in range(n):
        plan.append(boundary[(i // 3) % len(boundary)] if i % 3 == 0 else 60 + (i * 37) % 400)
    return plan


async def publish_ws(pub: Client, channel: str, plan: list[int], *, catch_up: StrictClient | None = None,
                     catch_up_until: int = 1 << 30, pace: float = 0) -> int:
    """Publish one message per planned length, pipelined (no refs, encoded beforehand so the
    publisher outruns the strict client); return how many went out.

    With ``catch_up``, wait before each large message (up to offset ``catch_up_until``)
    until that client got everything before it and every answer it asked for: its writer
    is idle then, so the large message goes out by a direct send, which the tiny buffers
    cut short inside it. With
    ``pace``, sleep that long after each message.
    """
    codec = MSGPACK if pub.encoding == "msgpack" else JSON
    messages = [{"type": "publish", "channel": channel, "data": data_of_length(codec, channel, i, length)}
                for i, length in enumerate(plan, start=1)]
    raw = [msgpack.packb(m) if pub.encoding == "msgpack" else json.dumps(m) for m in messages]
    sent = 0
    try:
        for item, length in zip(raw, plan):
            if catch_up is not None and length >= 16_000 and sent < catch_up_until:
                # everything read and answered: the writer is idle, trio-websocket has no pong
                # to write, so the large message goes out by a direct send
                await catch_up.wait_for(lambda: catch_up.last_offset[channel] >= sent and catch_up.idle(),
                                        "a catch-up")
            await pub.ws.send(item)
            sent += 1
            if pace:
                await trio.sleep(pace)
    except WebsocketsClosed:
        pass  # drained: the publisher is closed too
    return sent


async def publish_http(server: RelayServer, channel: str, plan: list[int]) -> None:
    for i, length in enumerate(plan, start=1):
        status, answer = await http_post_json(
            server, "/api/publish", {"channel": channel, "data": data_of_length(JSON, channel, i, length)})
        assert status == 200 and answer["offset"] == i, (status, answer)


def server_conn(server: RelayServer, client: StrictClient) -> Connection:
    return server.connections[client.welcome["session"]]


def channel_offset(server: RelayServer, channel: str) -> int:
    ch = server.hub.get(channel)
    return 0 if ch is None else ch.log.offset


# --------------------------------------------------------------------------- 1, 3, 4: fan-out under load

@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_fanout_with_pings_heartbeats_and_answers_stays_a_valid_ordered_stream(
        encoding: str, probe: Probe) -> None:
    n_ws, n_http = 150, 24
    plan_ws = lengths_plan(n_ws)
    with trio.fail_after(15):
        async with running_server(heartbeat=0.05, heartbeat_timeout=3, **BIG) as server, \
                StrictClient.connect(server, encoding, seed=1) as strict, \
                open_client(server, encoding) as pub:
            conn = server_conn(server, strict)
            probe.squeeze(conn)
            await strict.subscribe("s", "h", "own")
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(strict.chatter, stop, big_every=2))
                nursery.start_soon(partial(publish_ws, pub, "s", plan_ws, catch_up=strict))
                nursery.start_soon(publish_http, server, "h", lengths_plan(n_http))
                await strict.wait_for(
                    lambda: strict.last_offset["s"] == n_ws and strict.last_offset["h"] == n_http,
                    "every publication")
                # the chatter's large self-publishes keep partial writes going meanwhile
                await strict.wait_for(lambda: strict.server_pings >= 3, "three heartbeat pings")
                stop.set()
            await strict.wait_for(strict.idle, "answers to every request")
            assert strict.pongs >= 10 and strict.answers["pong"] >= 10 and strict.answers["error"] >= 2
            assert strict.answers["ack"] >= 2 and strict.last_offset["own"] == strict.answers["ack"]
            # every length boundary of the frame header was crossed
            expected = set(BOUNDARY_LENGTHS)
            assert expected <= strict.data_lengths, sorted(expected - strict.data_lengths)
            assert {7, 16, 64} <= set(strict.header_forms), strict.header_forms
            probe.assert_partial_writes(conn.id)
            # finally the client closes: one close frame back, then nothing
            await strict.send_close(1000)
            with trio.fail_after(3):
                await strict.done.wait()
            assert strict.close is not None and strict.close[0] == 1000, strict.close
            assert strict.end == "eof" and not strict.truncated, (strict.end, strict.truncated)


# --------------------------------------------------------------------------- 3a: drain

@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_drain_mid_stream_sends_every_frame_then_one_1001_close(encoding: str, probe: Probe) -> None:
    n = 400
    with trio.fail_after(15):
        async with running_server(heartbeat=0.05, heartbeat_timeout=3, drain_window=0.5,
                                  drain_timeout=5, **BIG) as server, \
                StrictClient.connect(server, encoding, seed=2) as strict, \
                open_client(server, encoding) as pub:
            conn = server_conn(server, strict)
            probe.squeeze(conn)
            await strict.subscribe("s", "own")
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(strict.chatter, stop, big_every=2))
                nursery.start_soon(partial(publish_ws, pub, "s", lengths_plan(n),
                                           catch_up=strict, catch_up_until=90))
                # drain with data still flowing (after offset 90 the publisher stops waiting)
                await strict.wait_for(lambda: strict.last_offset["s"] >= 95, "95 messages")
                published = channel_offset(server, "s")
                assert strict.last_offset["s"] < published, ("the drain should start mid-stream", published)
                await server.drain()
                stop.set()
            with trio.fail_after(3):
                await strict.done.wait()
            assert strict.close is not None, (strict.end, strict.truncated[:32])
            code, reason = strict.close
            assert code == 1001, strict.close
            hint = json.loads(reason)
            assert set(hint) == {"reconnect_after_ms"} and 0 <= hint["reconnect_after_ms"] <= 500, hint
            assert strict.last_offset["s"] >= published, (strict.last_offset["s"], published)
            assert strict.end in ("eof", "reset") and not strict.truncated
            probe.assert_partial_writes(conn.id)


# --------------------------------------------------------------------------- 3b: client closes

@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_client_close_mid_stream_gets_one_close_back_and_nothing_after(
        encoding: str, probe: Probe) -> None:
    n = 400
    with trio.fail_after(15):
        async with running_server(heartbeat=0.05, heartbeat_timeout=3, **BIG) as server, \
                StrictClient.connect(server, encoding, seed=3) as strict, \
                open_client(server, encoding) as pub:
            conn = server_conn(server, strict)
            probe.squeeze(conn)
            await strict.subscribe("s", "own")
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(strict.chatter, stop, big_every=2))
                nursery.start_soon(partial(publish_ws, pub, "s", lengths_plan(n),
                                           catch_up=strict, catch_up_until=90))
                # close with data still flowing (after offset 90 the publisher stops waiting)
                await strict.wait_for(lambda: strict.last_offset["s"] >= 95, "95 messages")
                stop.set()
                await strict.send_close(1000)
                with trio.fail_after(5):
                    await strict.done.wait()
                nursery.cancel_scope.cancel()
            assert strict.close is not None, (strict.end, strict.truncated[:32])
            assert strict.close[0] == 1000, strict.close
            assert strict.end == "eof" and not strict.truncated, (strict.end, strict.truncated[:32])
            probe.assert_partial_writes(conn.id)


# --------------------------------------------------------------------------- 3c: slow consumer 4002

@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_slow_consumer_close_mid_stream_leaves_a_valid_stream(encoding: str, probe: Probe) -> None:
    channels = [{"pattern": "slow.*", "mode": "stream", "slow_consumer": "disconnect"}]
    with trio.fail_after(15):
        async with running_server(heartbeat=0.05, heartbeat_timeout=3, channels=channels,
                                  max_message_size=64 * 1024, send_queue_size=160 * 1024) as server, \
                StrictClient.connect(server, encoding, seed=4) as strict, \
                open_client(server, encoding) as pub:
            strict.pause_probability, strict.pause = 0.5, 0.002  # slower still
            conn = server_conn(server, strict)
            probe.squeeze(conn)
            await strict.subscribe("slow.a", "own")
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(strict.chatter, stop)
                # faster than the client reads, slow enough that flushes happen in between;
                # the first few wait for the client (direct sends to an idle writer)
                nursery.start_soon(partial(publish_ws, pub, "slow.a", [20_000] * 400, pace=0.001,
                                           catch_up=strict, catch_up_until=8))
                with trio.fail_after(8):
                    await strict.done.wait()
                stop.set()
                nursery.cancel_scope.cancel()
            assert conn._close is not None and conn._close[0] == 4002, conn._close
            # The client kept reading, so no write stalled: the server had no reason to drop
            # the connection inside a frame. What it had begun must be finished, then 4002.
            assert not strict.truncated, strict.describe_truncation()
            # then the close frame, whole and last; or the end of TCP between two frames
            if strict.close is not None:
                assert strict.close[0] == 4002, strict.close
            assert strict.end in ("eof", "reset")
            assert strict.last_offset["slow.a"] >= 1, "the slow consumer should have got some messages first"
            probe.assert_partial_writes(conn.id)


# --------------------------------------------------------------------------- the race, targeted

class ArriveWhileHandling:
    """Makes chosen client bytes reach the server's socket right after a direct send to
    that client (from inside the server's ``fastpath.flush`` call).

    trio-websocket's reader then wakes in the next scheduling pass, while the rest of a
    direct send that the tiny buffers cut short is still waiting, so a control frame it
    answers (pong, close) races the writer task for the socket.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed: dict[str, tuple[int, bytes]] = {}
        self.fired = 0
        orig_flush = fastpath.flush
        arriving = self

        def flush(dirty: list[Any], by_encoding: list[int] | None = None) -> tuple[list[Any], int]:
            ids = [box.owner.id for box in dirty if box.owner is not None]
            result = orig_flush(dirty, by_encoding)
            for conn_id in ids:
                armed = arriving.armed.pop(conn_id, None)
                if armed is not None:
                    fd, data = armed
                    assert os.write(fd, data) == len(data)
                    arriving.fired += 1
            return result

        monkeypatch.setattr(fastpath, "flush", flush)

    def arm(self, conn: Connection, client: StrictClient, data: bytes) -> None:
        self.armed[conn.id] = (client.stream.socket.fileno(), data)


@pytest.fixture
def arriving(monkeypatch: pytest.MonkeyPatch) -> ArriveWhileHandling:
    return ArriveWhileHandling(monkeypatch)


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_pong_never_lands_inside_a_partially_sent_frame(
        encoding: str, probe: Probe, arriving: ArriveWhileHandling) -> None:
    rounds = 60
    with trio.fail_after(10):
        async with running_server(**BIG) as server, StrictClient.connect(server, encoding, seed=5) as strict:
            strict.pause_probability = 0
            conn = server_conn(server, strict)
            probe.squeeze(conn)
            await strict.subscribe("own")
            for i in range(1, rounds + 1):
                payload = b"race-%d" % i
                # a ~70 KB message and an ack for the client, a ping arriving meanwhile
                await strict.publish_own(f"r{i}", 70_000)
                strict.note(pings=(payload,))
                arriving.arm(conn, strict, masked_frame(OP_PING, payload))
                await strict.wait_for(lambda: strict.idle() and strict.last_offset["own"] == i, f"round {i}")
            assert arriving.fired == rounds and strict.pongs == rounds
            probe.assert_partial_writes(conn.id)


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_close_answer_never_lands_inside_a_partially_sent_frame(
        encoding: str, probe: Probe, arriving: ArriveWhileHandling) -> None:
    rounds = 40
    with trio.fail_after(10):
        async with running_server(**BIG) as server:
            conns = []
            for i in range(rounds):
                async with StrictClient.connect(server, encoding, seed=100 + i) as strict:
                    strict.pause_probability = 0
                    conn = server_conn(server, strict)
                    conns.append(conn.id)
                    probe.squeeze(conn)
                    await strict.subscribe("own")
                    await strict.publish_own("r", 70_000)
                    strict.note(closing=True)
                    arriving.arm(conn, strict, masked_frame(OP_CLOSE, struct.pack("!H", 1000)))
                    with trio.fail_after(3):
                        await strict.done.wait()
                    assert not strict.truncated, (
                        f"round {i}: " + strict.describe_truncation()
                        + "; bytes of another frame were written into it")
                    assert strict.close is not None and strict.close[0] == 1000, (i, strict.close, strict.end)
                    assert strict.end == "eof"
            assert arriving.fired == rounds
            # the server may answer the close before the message and ack (then drops them)
            probe.assert_partial_writes(*conns)


# --------------------------------------------------------------------------- a ping crossing the close

async def test_client_ping_crossing_the_servers_close_is_not_a_server_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """The server closes (as a drain does, with 1001); the client's ping was already on its
    way (here: sent right after the close frame arrived, which the server cannot tell
    apart). RFC 6455 lets the server ignore it; it must not crash the connection's tasks.

    The close comes from ``Connection.kick`` rather than ``server.drain()``: the drain stops
    the whole server right after, and that cancellation can swallow the crash's log record.
    """
    caplog.set_level(logging.ERROR, logger="relay")
    with trio.fail_after(10):
        async with running_server() as server, StrictClient.connect(server, "json") as strict:
            strict.ping_when_closed = True
            server_conn(server, strict).kick(1001, json.dumps({"reconnect_after_ms": 0}))
            with trio.fail_after(3):
                await strict.done.wait()
            assert strict.close is not None and strict.close[0] == 1001
            assert not strict.truncated
            # let the server finish with the connection (and log whatever went wrong)
            await trio.testing.wait_all_tasks_blocked()
            assert not server.connections
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert not errors, [r.getMessage() + "\n" + (r.exc_text or "")[-600:] for r in errors]


# --------------------------------------------------------------------------- 5: internals pinned

async def test_trio_websocket_internals_the_server_relies_on_are_there() -> None:
    """relay.server.ws / frontdoor reach into trio-websocket 0.12.2: when these change, the
    direct-send and stream-lock logic must be reviewed before the pin is moved."""
    assert trio_websocket.__version__ == "0.12.2"
    assert importlib.metadata.version("trio-websocket") == "0.12.2"
    left, _right = trio.testing.memory_stream_pair()
    ws = trio_websocket.WebSocketConnection(left, WSConnection(ConnectionType.SERVER))
    assert ws._stream is left
    assert isinstance(ws._stream_lock, trio.StrictFIFOLock)
    assert not ws._stream_lock.locked()
    assert ws._wsproto.state is ConnectionState.CONNECTING
    for name in ("_reader_task", "_get_request", "_handle_close_connection_event",
                 "_handle_ping_event", "_send", "_close_stream", "aclose", "ping"):
        assert callable(getattr(ws, name, None)), name
    assert callable(ws._recv_channel.receive_nowait)  # the reader handles what is parsed in one pass
    # frontdoor._ServerWebSocket._reader_task is trio-websocket's reader loop with one shared
    # table of handlers: when upstream's loop changes, that copy must be reviewed.
    upstream = inspect.getsource(trio_websocket.WebSocketConnection._reader_task)
    assert hashlib.sha256(upstream.encode()).hexdigest() == (
        "69826f541cb0278a8c63ab6e152d9326241cc5e254abd438e6db4e9de6268753")
    assert ws._reader_running is True and ws._receive_buffer_size > 0
    assert callable(ws._send_channel.aclose)  # closed by the reader at its end
    for name in ("_handle_accept_connection_event", "_handle_message_event", "_handle_reject_connection_event",
                 "_handle_reject_data_event", "_handle_request_event", "_abort_web_socket"):
        assert callable(getattr(ws, name, None)), name
    assert callable(getattr(ws, "_handle_pong_event", None))  # heartbeat pongs are noted there
    # an open connection's wsproto handshake is replaced by a stub with only events()
    proto = ws._wsproto
    assert proto.connection is None and callable(proto.handshake.events)
    assert ws.closed is None
    # the server reads the kernel socket of a trio socket for its direct sends
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        assert isinstance(sock._sock, socket.socket)  # type: ignore[attr-defined]
    finally:
        sock.close()
    assert fastpath.IMPLEMENTATION in ("cython", "python")
