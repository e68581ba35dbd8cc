"""Bad input: every malformed message gets a clear answer and the connection stays usable,
except where the protocol says the connection closes (invalid UTF-8 in a text frame: 1007,
an oversized message: 1009). Bad HTTP, half-open handshakes and unknown subprotocols are
refused at the front door without disturbing anybody else.

Clients are real: the ``websockets`` trio client (via the conftest), trio-websocket, and a
raw TCP socket (:class:`RawSocket`) where a test needs byte-level control. The raw helpers
here are shared with test_heartbeat.py and test_slow_consumer.py.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import trio
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.trio.client import connect

from relay.server.app import RelayServer

from .conftest import JSON_PROTO, MSGPACK_PROTO, Client, open_client, running_server

# --------------------------------------------------------------------------- raw helpers

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass
class Frame:
    opcode: int
    payload: bytes
    fin: bool = True

    @property
    def close_code(self) -> int | None:
        assert self.opcode == OP_CLOSE, self
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def close_reason(self) -> str:
        assert self.opcode == OP_CLOSE, self
        return self.payload[2:].decode("utf-8")

    def json(self) -> Any:
        assert self.opcode == OP_TEXT, self
        return json.loads(self.payload)


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes


class RawSocket:
    """A TCP connection to the server with byte-level control: hand-made HTTP and frames.

    ``end`` records how the server ended the TCP connection once it did: ``"eof"`` (FIN)
    or ``"reset"``.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.end: str | None = None

    @classmethod
    async def open(cls, port: int, *, rcvbuf: int | None = None) -> RawSocket:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect, so the advertised window (and its scaling) stays small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
        return cls(trio.SocketStream(sock))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self, max_bytes: int = 65536) -> bool:
        """Read more bytes into the buffer; False once the server ended the connection."""
        if self.end is not None:
            return False
        try:
            data = await self.stream.receive_some(max_bytes)
        except trio.BrokenResourceError:
            self.end = "reset"
            return False
        if not data:
            self.end = "eof"
            return False
        self.buf += data
        return True

    async def read_exactly(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not await self._fill():
                return None
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_until(self, delimiter: bytes) -> bytes | None:
        while (i := self.buf.find(delimiter)) < 0:
            if not await self._fill():
                return None
        data = bytes(self.buf[: i + len(delimiter)])
        del self.buf[: i + len(delimiter)]
        return data

    async def read_to_end(self) -> bytes:
        """Read until the server ends the connection; return what was not consumed yet."""
        while await self._fill():
            pass
        data = bytes(self.buf)
        self.buf.clear()
        return data

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    # -- HTTP --------------------------------------------------------------------------

    async def read_response(self) -> HttpResponse | None:
        head = await self.read_until(b"\r\n\r\n")
        if head is None:
            return None
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = b""
        if status != 101:
            body = await self.read_exactly(int(headers.get("content-length", "0"))) or b""
        return HttpResponse(status, headers, body)

    async def handshake(self, *, path: str = "/ws", subprotocols: tuple[str, ...] = (),
                        expect: int = 101) -> HttpResponse:
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
        ]
        if subprotocols:
            lines.append("Sec-WebSocket-Protocol: " + ", ".join(subprotocols))
        await self.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        response = await self.read_response()
        assert response is not None, f"the server ended the connection ({self.end}) during the handshake"
        assert response.status == expect, response
        if expect == 101:
            accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
            assert response.headers["sec-websocket-accept"] == accept
        return response

    # -- WebSocket frames (client side: masked) ------------------------------------------

    async def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True,
                         length: int | None = None) -> None:
        """Send one masked frame; ``length`` overrides the announced payload length."""
        n = len(payload) if length is None else length
        head = bytes([(0x80 if fin else 0) | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 0x10000:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await self.send(head + mask + masked)

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send_frame(OP_TEXT, json.dumps(message).encode())

    async def send_close(self, code: int = 1000) -> None:
        await self.send_frame(OP_CLOSE, struct.pack("!H", code))

    async def recv_frame(self) -> Frame | None:
        """Return the next server frame, or None when the connection ended before one."""
        head = await self.read_exactly(2)
        if head is None:
            return None
        assert not head[1] & 0x80, "server frames must not be masked"
        n = head[1] & 0x7F
        if n == 126:
            ext = await self.read_exactly(2)
            if ext is None:
                return None
            n = struct.unpack("!H", ext)[0]
        elif n == 127:
            ext = await self.read_exactly(8)
            if ext is None:
                return None
            n = struct.unpack("!Q", ext)[0]
        payload = await self.read_exactly(n)
        if payload is None:
            return None
        return Frame(head[0] & 0x0F, payload, bool(head[0] & 0x80))

    async def recv_json(self, *, answer_pings: bool = True) -> dict[str, Any]:
        """Return the next JSON message, answering (or skipping) pings on the way."""
        while True:
            frame = await self.recv_frame()
            assert frame is not None, f"connection ended ({self.end}) while waiting for a message"
            if frame.opcode == OP_PING:
                if answer_pings:
                    await self.send_frame(OP_PONG, frame.payload)
                continue
            assert frame.opcode == OP_TEXT and frame.fin, frame
            return frame.json()  # type: ignore[no-any-return]

    async def frames_to_end(self) -> list[Frame]:
        """Read frames until the connection ends; a trailing partial frame is dropped."""
        frames = []
        while (frame := await self.recv_frame()) is not None:
            frames.append(frame)
        return frames


async def raw_ws(server: RelayServer, *, rcvbuf: int | None = None,
                 subprotocols: tuple[str, ...] = ()) -> RawSocket:
    """Open a raw WebSocket connection (JSON) and read its welcome."""
    raw = await RawSocket.open(server.port, rcvbuf=rcvbuf)
    try:
        await raw.handshake(subprotocols=subprotocols)
        welcome = await raw.recv_json()
        assert welcome["type"] == "welcome", welcome
    except BaseException:
        await raw.aclose()
        raise
    return raw


async def http_request(server: RelayServer, method: str, path: str, body: bytes = b"",
                       headers: tuple[str, ...] = ()) -> HttpResponse:
    """One plain HTTP/1.1 request on a fresh connection."""
    raw = await RawSocket.open(server.port)
    try:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}", *headers]
        await raw.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        response = await raw.read_response()
        assert response is not None, f"no HTTP response ({raw.end})"
        return response
    finally:
        await raw.aclose()


_refs = itertools.count(1000)


async def assert_usable(c: Client) -> None:
    """The connection still answers: a ping gets its pong, a subscribe its subscribed."""
    ref = next(_refs)
    assert await c.request({"type": "ping", "ref": ref}) == {"type": "pong", "ref": ref}
    channel = f"u{ref}"
    answer = await c.request({"type": "subscribe", "channel": channel, "ref": ref})
    assert answer["type"] == "subscribed" and answer["ref"] == ref and answer["channel"] == channel, answer


def assert_bad_request(answer: dict[str, Any], *, ref: Any = None) -> None:
    """An ``error`` with code bad_request and a message; ``ref`` exactly when one is given."""
    assert answer["type"] == "error", answer
    assert answer["code"] == "bad_request", answer
    assert isinstance(answer["message"], str) and answer["message"].strip(), answer
    if ref is None:
        assert "ref" not in answer, answer
    else:
        assert answer["ref"] == ref and type(answer["ref"]) is type(ref), answer


# --------------------------------------------------------------------------- undecodable input

BAD_JSON_TEXTS = {
    "not-json": "{not json",
    "empty": "",
    "truncated": '{"type": "ping", "ref": 1',
    "trailing-garbage": '{"type": "ping", "ref": 1} x',
    "nan-literal": '{"type": "ping", "ref": NaN}',
    "single-quotes": "{'type': 'ping'}",
    "deeply-nested": "[" * 20000 + "]" * 20000,
}


@pytest.mark.parametrize("text", BAD_JSON_TEXTS.values(), ids=BAD_JSON_TEXTS.keys())
async def test_invalid_json_text_gets_bad_request(text: str) -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as c:
            await c.ws.send(text)
            assert_bad_request(await c.recv())
            await assert_usable(c)


NON_OBJECTS = {
    "array": "[1, 2]",
    "array-of-message": '[{"type": "ping", "ref": 1}]',
    "number": "42",
    "float": "1.5",
    "string": '"ping"',
    "null": "null",
    "true": "true",
}


@pytest.mark.parametrize("text", NON_OBJECTS.values(), ids=NON_OBJECTS.keys())
async def test_json_value_that_is_not_an_object_gets_bad_request(text: str) -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as c:
            await c.ws.send(text)
            answer = await c.recv()
            assert_bad_request(answer)
            assert "object" in answer["message"], answer
            await assert_usable(c)


@pytest.mark.parametrize("payload", [
    b'{"type": "ping", "ref": 1}',  # valid JSON, wrong frame type
    msgpack.packb({"type": "ping", "ref": 1}),
    b"",
], ids=["json-bytes", "msgpack-bytes", "empty"])
async def test_binary_frame_on_json_connection_gets_bad_request(payload: bytes) -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as c:
            await c.ws.send(payload)
            answer = await c.recv()
            assert_bad_request(answer)
            assert "binary" in answer["message"], answer
            await assert_usable(c)


async def test_text_frame_on_msgpack_connection_gets_bad_request() -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server, "msgpack") as c:
            await c.ws.send('{"type": "ping", "ref": 1}')
            answer = await c.recv()
            assert_bad_request(answer)
            assert "text" in answer["message"], answer
            await assert_usable(c)


BAD_MSGPACK = {
    "never-used-byte": b"\xc1",
    "truncated-map": b"\x82\xa4type\xa4ping",
    "extra-data": msgpack.packb({"type": "ping", "ref": 1}) + b"\x00",
    "ext-type": msgpack.packb({"type": "ping", "x": msgpack.ExtType(5, b"\x00")}),
    "empty": b"",
    "array": msgpack.packb([{"type": "ping", "ref": 1}]),
    "integer": msgpack.packb(5),
    "bin": msgpack.packb(b'{"type":"ping"}', use_bin_type=True),
    "invalid-utf8-value": b"\x81\xa4type\xa2\xff\xfe",
    "invalid-utf8-key": b"\x82\xa4type\xa4ping\xa2\xc3\x28\x01",
    "invalid-utf8-channel": b"\x82\xa4type\xa9subscribe\xa7channel\xa3a\xed\xa0",
}


@pytest.mark.parametrize("payload", BAD_MSGPACK.values(), ids=BAD_MSGPACK.keys())
async def test_invalid_msgpack_gets_bad_request(payload: bytes) -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server, "msgpack") as c:
            await c.ws.send(payload)
            assert_bad_request(await c.recv())
            await assert_usable(c)


NON_JSON_DATA = {
    "bytes": b"\x00\x01\xff",
    "int-keys": {1: "one"},
    "bytes-keys": {b"k": 1},
    "nested-bytes": {"list": [1, {"deep": b"x"}]},
    "nested-int-key": [{"ok": {2: 3}}],
    "nan": float("nan"),
    "infinity": float("inf"),
    "ext": msgpack.ExtType(7, b"abc"),
    "timestamp": msgpack.Timestamp(1, 0),
}


@pytest.mark.parametrize("ref", [7, "r-7"], ids=["int-ref", "str-ref"])
@pytest.mark.parametrize("data", NON_JSON_DATA.values(), ids=NON_JSON_DATA.keys())
async def test_msgpack_publish_of_data_json_cannot_carry_is_refused(data: Any, ref: Any) -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server, "msgpack") as pub, \
                open_client(server) as sub:
            await sub.subscribe("m")
            await pub.ws.send(msgpack.packb(
                {"type": "publish", "channel": "m", "data": data, "ref": ref}, use_bin_type=True))
            answer = await pub.recv()
            # ext-type data fails already while decoding (no ref known yet); everything
            # else is refused after parsing and must echo the ref
            assert_bad_request(answer, ref=None if isinstance(data, msgpack.ExtType) else ref)
            await assert_usable(pub)
            # nothing was published: the next good message is offset 1 for the subscriber
            ack = await pub.publish("m", {"ok": True}, ref=1)
            assert ack["offset"] == 1, ack
            assert await sub.recv() == {"type": "message", "channel": "m", "offset": 1, "data": {"ok": True}}


# JSON that parses but that not every subscriber can receive: a number that overflows to
# infinity (JSON subscribers cannot get it) and an integer wider than 64 bits (MessagePack
# subscribers cannot get it). The publisher must get a bad_request, not a 1011 close, and
# the channel's history must not be poisoned.
UNCARRIABLE_JSON_DATA = {
    "overflowing-float": "1e999",
    "negative-overflowing-float": "-1e999",
    "int-over-64-bits": "123456789012345678901234567890",
    "nested-int-over-64-bits": '{"a": [1, 18446744073709551616]}',
}


@pytest.mark.parametrize("subscriber_encoding", ["json", "msgpack"])
@pytest.mark.parametrize("literal", UNCARRIABLE_JSON_DATA.values(), ids=UNCARRIABLE_JSON_DATA.keys())
async def test_json_publish_of_data_some_subscriber_cannot_receive_is_refused(
        literal: str, subscriber_encoding: str) -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as pub, \
                open_client(server, subscriber_encoding) as sub:
            await sub.subscribe("n")
            await pub.ws.send('{"type": "publish", "channel": "n", "ref": 3, "data": %s}' % literal)
            try:
                answer = await pub.recv()
            except ConnectionClosed as exc:
                pytest.fail(f"the publisher was disconnected instead of answered: {exc}")
            assert_bad_request(answer, ref=3)
            await assert_usable(pub)
            assert (await pub.publish("n", 1, ref=4))["offset"] == 1
            assert (await sub.recv())["offset"] == 1


@pytest.mark.parametrize("literal", UNCARRIABLE_JSON_DATA.values(), ids=UNCARRIABLE_JSON_DATA.keys())
async def test_http_publish_of_data_some_subscriber_cannot_receive_is_refused(literal: str) -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            body = ('{"channel": "h", "data": %s}' % literal).encode()
            response = await http_request(server, "POST", "/api/publish", body)
            assert response.status == 400, response
            assert json.loads(response.body)["error"] == "bad_request"
            # the history endpoint still answers (nothing unencodable was stored)
            ok = await http_request(server, "POST", "/api/publish", b'{"channel": "h", "data": 1}')
            assert ok.status == 200 and json.loads(ok.body)["offset"] == 1, ok
            history = await http_request(server, "GET", "/api/channels/h/history")
            assert history.status == 200, history
            assert [p["data"] for p in json.loads(history.body)["publications"]] == [1]


@pytest.mark.parametrize("literal, encoding", [
    ("1e999", "json"), ("123456789012345678901234567890", "msgpack"),
], ids=["overflowing-float", "int-over-64-bits"])
async def test_recovering_a_channel_never_kills_the_subscriber(literal: str, encoding: str) -> None:
    # Whatever a backend managed to publish, a client that recovers the channel's history
    # must get an answer, not a 1011 close (it would reconnect and be killed again, forever).
    with trio.fail_after(10):
        async with running_server() as server:
            await http_request(server, "POST", "/api/publish", ('{"channel": "p", "data": %s}' % literal).encode())
            ok = await http_request(server, "POST", "/api/publish", b'{"channel": "p", "data": "fine"}')
            assert ok.status == 200, ok
            epoch = json.loads(ok.body)["epoch"]
            async with open_client(server, encoding) as c:
                try:
                    answer = await c.request({"type": "subscribe", "channel": "p", "ref": 1,
                                              "since": {"epoch": epoch, "offset": 0}})
                    assert answer["type"] == "subscribed", answer
                    last = answer
                    while last.get("data") != "fine":
                        last = await c.recv()
                    await assert_usable(c)
                except ConnectionClosed as exc:
                    pytest.fail(f"the recovering subscriber was disconnected: {exc}")


PROTOCOL_VIOLATIONS = {
    "unmasked-frame": b"\x81\x02hi",
    "reserved-bits": b"\xf1\x80abcd",
    "unknown-opcode": b"\x83\x80abcd",
    "fragmented-ping": b"\x09\x80abcd",
    "oversized-control": b"\x89\xfe\x00\x7eabcd" + b"\x00" * 126,
    "continuation-first": b"\x80\x80abcd",
}


@pytest.mark.parametrize("violation", PROTOCOL_VIOLATIONS.values(), ids=PROTOCOL_VIOLATIONS.keys())
async def test_frame_level_protocol_violation_ends_the_connection(violation: bytes) -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as other:
            raw = await raw_ws(server)
            try:
                await raw.send(violation)
                frames = [f for f in await raw.frames_to_end() if f.opcode != OP_PING]
            finally:
                await raw.aclose()
            # no answer to the bad frame, only a close frame saying "protocol error" (RFC 6455
            # 7.1.7: fail the connection, sending the close code first), then the TCP close
            assert [f.opcode for f in frames] == [OP_CLOSE], frames
            assert frames[0].close_code == 1002, frames[0]
            assert raw.end in ("eof", "reset")
            await assert_usable(other)


INVALID_UTF8 = {
    "text-frame": [(OP_TEXT, b'{"type": "ping", "x": "\xff\xfe"}', True)],
    "only-ff-fe": [(OP_TEXT, b"\xff\xfe", True)],
    "surrogate": [(OP_TEXT, b'{"type": "ping", "x": "\xed\xa0\x80"}', True)],
    # valid first fragment ending inside a character, a continuation that breaks it
    "across-fragments": [(OP_TEXT, b'{"type": "ping", "x": "\xc3', False), (OP_CONT, b'("}', True)],
    "close-reason": [(OP_CLOSE, b"\x03\xe8\xff\xfe", True)],
}


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
@pytest.mark.parametrize("frames_to_send", INVALID_UTF8.values(), ids=INVALID_UTF8.keys())
async def test_invalid_utf8_in_text_frame_closes_with_1007(
        frames_to_send: list[tuple[int, bytes, bool]], encoding: str) -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as other:
            raw = await RawSocket.open(server.port)
            try:
                await raw.handshake(subprotocols=(MSGPACK_PROTO,) if encoding == "msgpack" else ())
                welcome = await raw.recv_frame()
                assert welcome is not None and welcome.opcode in (OP_TEXT, OP_BINARY)
                for opcode, payload, fin in frames_to_send:
                    await raw.send_frame(opcode, payload, fin=fin)
                frames = [f for f in await raw.frames_to_end() if f.opcode != OP_PING]
            finally:
                await raw.aclose()
            assert frames, f"the connection ended ({raw.end}) without a close frame"
            assert frames[-1].opcode == OP_CLOSE, frames
            assert frames[-1].close_code == 1007, frames[-1]
            assert all(f.opcode == OP_CLOSE for f in frames), "no answer to the invalid frame"
            await assert_usable(other)


# --------------------------------------------------------------------------- invalid messages

BAD_TYPES = {
    "unknown": {"type": "shout"},
    "server-type": {"type": "welcome"},
    "case": {"type": "PING"},
    "missing": {},
    "null": {"type": None},
    "number": {"type": 1},
    "list": {"type": ["ping"]},
    "object": {"type": {"ping": True}},
    "bool": {"type": True},
}


@pytest.mark.parametrize("ref", [None, 11, "r11"], ids=["no-ref", "int-ref", "str-ref"])
@pytest.mark.parametrize("message", BAD_TYPES.values(), ids=BAD_TYPES.keys())
async def test_bad_type_gets_bad_request_with_ref(message: dict[str, Any], ref: Any) -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as c:
            if ref is not None:
                message = {**message, "ref": ref}
            assert_bad_request(await c.request(message), ref=ref)
            await assert_usable(c)


BAD_FIELDS = {
    "subscribe-no-channel": {"type": "subscribe"},
    "subscribe-null-channel": {"type": "subscribe", "channel": None},
    "subscribe-number-channel": {"type": "subscribe", "channel": 5},
    "subscribe-list-channel": {"type": "subscribe", "channel": ["a"]},
    "subscribe-object-channel": {"type": "subscribe", "channel": {"name": "a"}},
    "unsubscribe-no-channel": {"type": "unsubscribe"},
    "unsubscribe-number-channel": {"type": "unsubscribe", "channel": 1.5},
    "publish-no-data": {"type": "publish", "channel": "a"},
    "publish-no-channel": {"type": "publish", "data": 1},
    "publish-number-channel": {"type": "publish", "channel": 7, "data": 1},
    "since-string": {"type": "subscribe", "channel": "a", "since": "0"},
    "since-number": {"type": "subscribe", "channel": "a", "since": 5},
    "since-list": {"type": "subscribe", "channel": "a", "since": ["e", 1]},
    "since-empty": {"type": "subscribe", "channel": "a", "since": {}},
    "since-no-offset": {"type": "subscribe", "channel": "a", "since": {"epoch": "e"}},
    "since-no-epoch": {"type": "subscribe", "channel": "a", "since": {"offset": 1}},
    "since-number-epoch": {"type": "subscribe", "channel": "a", "since": {"epoch": 1, "offset": 1}},
    "since-negative-offset": {"type": "subscribe", "channel": "a", "since": {"epoch": "e", "offset": -1}},
    "since-string-offset": {"type": "subscribe", "channel": "a", "since": {"epoch": "e", "offset": "3"}},
    "since-float-offset": {"type": "subscribe", "channel": "a", "since": {"epoch": "e", "offset": 1.5}},
    "since-bool-offset": {"type": "subscribe", "channel": "a", "since": {"epoch": "e", "offset": True}},
    "refresh-no-token": {"type": "refresh"},
    "refresh-number-token": {"type": "refresh", "token": 5},
    "refresh-empty-token": {"type": "refresh", "token": ""},
}


@pytest.mark.parametrize("ref", [None, 12, "r12"], ids=["no-ref", "int-ref", "str-ref"])
@pytest.mark.parametrize("message", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
async def test_missing_or_mistyped_field_gets_bad_request_with_ref(message: dict[str, Any], ref: Any) -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as c:
            if ref is not None:
                message = {**message, "ref": ref}
            assert_bad_request(await c.request(message), ref=ref)
            await assert_usable(c)
            # a refused subscribe did not half-subscribe: subscribing to "a" works now
            assert (await c.request({"type": "subscribe", "channel": "a"}))["type"] == "subscribed"


BAD_REFS = {
    "float": 1.5,
    "integral-float": 2.0,
    "list": [1],
    "object": {"id": 1},
    "true": True,
    "false": False,
    "too-long-string": "x" * 257,
}


@pytest.mark.parametrize("message", [
    {"type": "ping"},
    {"type": "subscribe", "channel": "a"},
    {"type": "publish", "channel": "a", "data": 1},
    {"type": "shout"},
], ids=["ping", "subscribe", "publish", "unknown-type"])
@pytest.mark.parametrize("ref", BAD_REFS.values(), ids=BAD_REFS.keys())
async def test_invalid_ref_gets_bad_request_without_ref(message: dict[str, Any], ref: Any) -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as c:
            answer = await c.request({**message, "ref": ref})
            assert_bad_request(answer)
            assert "ref" in answer["message"], answer
            await assert_usable(c)
            if message["type"] == "publish":
                # the refused publish was not published
                assert (await c.publish("a", 2, ref=1))["offset"] == 1


async def test_msgpack_bad_request_echoes_int_and_string_refs() -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server, "msgpack") as c:
            for ref in (5, "five"):
                assert_bad_request(await c.request({"type": "subscribe", "channel": 5, "ref": ref}), ref=ref)
            assert_bad_request(await c.request({"type": "ping", "ref": b"bytes"}))
            assert_bad_request(await c.request({"type": "ping", "ref": 1.0}))
            await assert_usable(c)


BAD_CHANNELS = {
    "empty": "",
    "too-long": "x" * 256,
    "nul": "a\x00b",
    "newline": "a\nb",
    "del": "a\x7fb",
    "tab": "a\tb",
    "space": "a b",
    "leading-space": " a",
    "trailing-space": "a ",
    "nbsp": "a\u00a0b",
    "line-separator": "a\u2028b",
    "escape": "\x1b[31m",
}


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe", "publish"])
@pytest.mark.parametrize("channel", BAD_CHANNELS.values(), ids=BAD_CHANNELS.keys())
async def test_bad_channel_name_gets_bad_request_with_ref(channel: str, kind: str) -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as c:
            message: dict[str, Any] = {"type": kind, "channel": channel, "ref": "c1"}
            if kind == "publish":
                message["data"] = 1
            answer = await c.request(message)
            assert_bad_request(answer, ref="c1")
            assert "channel" in answer["message"], answer
            await assert_usable(c)


async def test_channel_name_length_limit_is_inclusive_and_configurable() -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as c:
            assert (await c.subscribe("x" * 255))["channel"] == "x" * 255
            assert (await c.publish("é" * 255, 1))["offset"] == 1  # characters, not bytes
        async with running_server(max_channel_length=8) as server, open_client(server) as c:
            await c.subscribe("12345678")
            assert_bad_request(await c.request({"type": "subscribe", "channel": "123456789", "ref": 1}), ref=1)
            await assert_usable(c)


# --------------------------------------------------------------------------- size limit

async def test_oversized_message_closes_with_1009_and_others_are_unaffected() -> None:
    limit = 1024
    with trio.fail_after(10):
        async with running_server(max_message_size=limit, send_queue_size=64 * 1024) as server, \
                open_client(server) as big, open_client(server) as other, open_client(server) as pub:
            await other.subscribe("o")
            # exactly at the limit is fine
            head = '{"type":"publish","channel":"o","ref":1,"data":"'
            at_limit = head + "a" * (limit - len(head) - 2) + '"}'
            assert len(at_limit.encode()) == limit
            await big.ws.send(at_limit)
            assert (await big.recv())["type"] == "ack"
            assert (await other.recv())["offset"] == 1
            # one byte more closes the connection with 1009
            await big.ws.send(at_limit.replace('"data":"', '"data":"a'))
            with pytest.raises(ConnectionClosed) as info:
                await big.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009, info.value
            # the others carry on
            await assert_usable(other)
            assert (await pub.publish("o", "after", ref=2))["offset"] == 2
            assert await other.recv() == {"type": "message", "channel": "o", "offset": 2, "data": "after"}


async def test_oversized_fragmented_message_closes_with_1009() -> None:
    with trio.fail_after(10):
        async with running_server(max_message_size=1024, send_queue_size=64 * 1024) as server, \
                open_client(server) as c, open_client(server) as other:
            # every fragment is small; the message as a whole is not
            with contextlib.suppress(ConnectionClosed):  # the close may come mid-message
                await c.ws.send(['{"type":"ping","pad":"', "a" * 600, "b" * 600, '"}'])
            with pytest.raises(ConnectionClosed) as info:
                await c.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009, info.value
            await assert_usable(other)


async def test_frame_announcing_a_huge_length_closes_with_1009() -> None:
    with trio.fail_after(10):
        async with running_server(max_message_size=1024, send_queue_size=64 * 1024) as server, \
                open_client(server) as other:
            raw = await raw_ws(server)
            try:
                # announce 1 TiB, send a little more than the limit, then wait for the verdict
                await raw.send_frame(OP_BINARY, b"\x00" * 2048, length=1 << 40)
                frames = [f for f in await raw.frames_to_end() if f.opcode != OP_PING]
            finally:
                await raw.aclose()
            assert frames and frames[-1].opcode == OP_CLOSE, (frames, raw.end)
            assert frames[-1].close_code == 1009, frames[-1]
            await assert_usable(other)


# --------------------------------------------------------------------------- handshake

async def test_only_unknown_subprotocols_are_refused_with_400_naming_the_supported_ones() -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            for offered in (["chat.v9"], ["chat.v9", "relay.v2.json"]):
                with pytest.raises(InvalidStatus) as info:
                    async with connect(server.url, subprotocols=offered):
                        pass
                response = info.value.response
                assert response.status_code == 400, response
                body = (response.body or b"").decode()
                assert JSON_PROTO in body and MSGPACK_PROTO in body, body
            async with open_client(server) as c:
                await assert_usable(c)


@pytest.mark.parametrize("offered, chosen", [
    (["chat.v9", MSGPACK_PROTO], MSGPACK_PROTO),
    ([MSGPACK_PROTO, "chat.v9"], MSGPACK_PROTO),
    (["chat.v9", JSON_PROTO], JSON_PROTO),
])
async def test_mixed_subprotocols_choose_the_known_one(offered: list[str], chosen: str) -> None:
    with trio.fail_after(10):
        async with running_server() as server, connect(server.url, subprotocols=offered) as ws:
            assert ws.subprotocol == chosen
            welcome = await ws.recv()
            if chosen == MSGPACK_PROTO:
                assert isinstance(welcome, bytes), "msgpack connections get binary frames"
                assert msgpack.unpackb(welcome)["type"] == "welcome"
                await ws.send(msgpack.packb({"type": "ping", "ref": 1}))
                assert msgpack.unpackb(await ws.recv()) == {"type": "pong", "ref": 1}
            else:
                assert isinstance(welcome, str)
                assert json.loads(welcome)["type"] == "welcome"


async def test_no_subprotocol_gives_json() -> None:
    with trio.fail_after(10):
        async with running_server() as server, connect(server.url) as ws:
            assert ws.subprotocol is None
            welcome = await ws.recv()
            assert isinstance(welcome, str), "JSON connections get text frames"
            assert json.loads(welcome)["type"] == "welcome"
            await ws.send('{"type": "ping", "ref": "j"}')
            assert json.loads(await ws.recv()) == {"type": "pong", "ref": "j"}


async def _expect_dropped(raw: RawSocket) -> bytes:
    """Read until the server ends the connection; return what it said first (if anything)."""
    said = await raw.read_to_end()
    assert raw.end in ("eof", "reset")
    return said


async def test_half_open_handshake_is_dropped_after_handshake_timeout() -> None:
    with trio.fail_after(10):
        async with running_server(handshake_timeout=0.5) as server:
            half = await RawSocket.open(server.port)
            silent = await RawSocket.open(server.port)
            trickle = await RawSocket.open(server.port)
            request = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                       b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            await half.send(request[: len(request) // 2])

            async def trickle_bytes() -> None:
                # a slowloris: one byte every 0.1 s never completes the request in time
                for i in range(len(request)):
                    try:
                        await trickle.send(request[i:i + 1])
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                    await trio.sleep(0.1)

            ended = trio.Event()
            results: dict[str, bytes] = {}

            async def wait_dropped(name: str, raw: RawSocket) -> None:
                results[name] = await _expect_dropped(raw)
                if len(results) == 3:
                    ended.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle_bytes)
                for name, raw in (("half", half), ("silent", silent), ("trickle", trickle)):
                    nursery.start_soon(wait_dropped, name, raw)
                # meanwhile the server serves others
                async with open_client(server) as c:
                    await assert_usable(c)
                    with trio.fail_after(3):
                        await ended.wait()
                    await assert_usable(c)
                nursery.cancel_scope.cancel()
            for name, said in results.items():
                # dropped without a 101 (a 408 would be fine, a switch would not)
                assert not said.startswith(b"HTTP/1.1 101"), (name, said)
            for raw in (half, silent, trickle):
                await raw.aclose()


GARBAGE = {
    "tls-client-hello": bytes.fromhex("16030100a5010000a10303") + os.urandom(32) + b"\r\n\r\n",
    "binary-noise": b"\x00\xff\x13\x37" * 64 + b"\r\n\r\n",
    "words": b"hello relay, are you there?\r\n\r\n",
    "bad-request-line": b"GET\r\n\r\n",
    "negative-content-length": b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "bad-header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "websocket-frame-first": b"\x81\x85abcd" + bytes(x ^ y for x, y in zip(b"hello", b"abcd")),
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
async def test_garbage_that_is_not_http_gets_400_or_a_close(garbage: bytes) -> None:
    with trio.fail_after(10):
        async with running_server(handshake_timeout=1.0) as server:
            raw = await RawSocket.open(server.port)
            try:
                await raw.send(garbage)
                said = await _expect_dropped(raw)
            finally:
                await raw.aclose()
            if said:
                assert said.startswith(b"HTTP/1.1 400 "), said
            async with open_client(server) as c:
                await assert_usable(c)
            health = await http_request(server, "GET", "/healthz")
            assert health.status == 200


@pytest.mark.parametrize("path", ["/", "/wss", "/ws/", "/ws/extra", "/WS", "/api/publish", "/sse"])
async def test_upgrade_to_another_path_gets_404(path: str) -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            with pytest.raises(InvalidStatus) as info:
                async with connect(server.url[: -len("/ws")] + path):
                    pass
            assert info.value.response.status_code == 404, info.value.response
            raw = await RawSocket.open(server.port)
            try:
                await raw.handshake(path=path, expect=404)
            finally:
                await raw.aclose()
            async with open_client(server) as c:  # and /ws still works, query string or not
                await assert_usable(c)
            async with connect(server.url + "?x=1") as ws:
                assert json.loads(await ws.recv())["type"] == "welcome"


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("ref", [21, "r21"])
async def test_refresh_without_auth_is_an_error_with_the_ref(ref: Any) -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as c:
            answer = await c.request({"type": "refresh", "token": "a.b.c", "ref": ref})
            assert answer["type"] == "error", answer
            assert answer["ref"] == ref
            assert answer["code"] in ("bad_request", "unauthorized", "forbidden"), answer
            assert answer["message"].strip()
            await assert_usable(c)


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_client_publish_false_is_forbidden_but_http_publish_works(encoding: str) -> None:
    channels = [{"pattern": "news.*", "client_publish": False}]
    with trio.fail_after(10):
        async with running_server(channels=channels) as server, open_client(server, encoding) as c, \
                open_client(server) as sub:
            await sub.subscribe("news.today")
            for ref in (31, "r31"):
                answer = await c.request({"type": "publish", "channel": "news.today", "data": 1, "ref": ref})
                assert answer["type"] == "error" and answer["code"] == "forbidden", answer
                assert answer["ref"] == ref and answer["message"].strip(), answer
            await assert_usable(c)
            # other channels are still open to clients
            assert (await c.publish("chat.today", 1))["offset"] == 1
            # the backend path works; the subscriber sees exactly that one message
            response = await http_request(server, "POST", "/api/publish",
                                          b'{"channel": "news.today", "data": {"headline": "x"}}')
            assert response.status == 200, response
            assert json.loads(response.body)["offset"] == 1
            assert await sub.recv() == {"type": "message", "channel": "news.today", "offset": 1,
                                        "data": {"headline": "x"}}
            # and a client subscribed to it can still read it
            await c.subscribe("news.today")
