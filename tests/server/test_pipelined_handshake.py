"""Frames a client sends right behind its upgrade request, in the same TCP write, before
the server's 101 (RFC 6455 says to wait; some clients do not): the server holds them until
the handshake is answered, then reads them like any other frames, in order.
"""

from __future__ import annotations

import base64
import json
import os
import struct

import trio

from .conftest import running_server
from .test_bad_input import OP_CLOSE, OP_TEXT, RawSocket


def masked(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def upgrade_request(*, line_end: bytes = b"\r\n") -> bytes:
    key = base64.b64encode(os.urandom(16))
    lines = [b"GET /ws HTTP/1.1", b"Host: 127.0.0.1", b"Upgrade: websocket", b"Connection: Upgrade",
             b"Sec-WebSocket-Key: " + key, b"Sec-WebSocket-Version: 13"]
    return line_end.join(lines) + line_end + line_end


def publish(i: int) -> bytes:
    return masked(OP_TEXT, json.dumps({"type": "publish", "channel": "pipe.1", "data": {"i": i},
                                       "ref": i}).encode())


async def read_answers(raw: RawSocket, n: int) -> list[dict[str, object]]:
    response = await raw.read_response()
    assert response is not None and response.status == 101, response
    answers = []
    with trio.fail_after(5):
        while len(answers) < n:
            answers.append(await raw.recv_json())
    return answers


async def test_frames_sent_with_the_upgrade_request_are_answered_in_order() -> None:
    async with running_server() as server:
        raw = await RawSocket.open(server.port)
        try:
            await raw.send(upgrade_request() + b"".join(publish(i) for i in range(20)))
            answers = await read_answers(raw, 21)
        finally:
            await raw.aclose()
    assert answers[0]["type"] == "welcome"
    assert [(a["type"], a["ref"], a["offset"]) for a in answers[1:]] == [
        ("ack", i, i + 1) for i in range(20)]


async def test_a_frame_cut_by_the_end_of_the_first_write_is_completed_by_the_next() -> None:
    async with running_server() as server:
        raw = await RawSocket.open(server.port)
        try:
            frames = publish(0) + publish(1)
            await raw.send(upgrade_request(line_end=b"\n") + frames[:9])  # (bare LF: h11 takes it)
            await trio.sleep(0.05)
            await raw.send(frames[9:])
            answers = await read_answers(raw, 3)
            # a close frame in the same write as a publish: its ack, then the close reply
            await raw.send(publish(2) + masked(OP_CLOSE, struct.pack("!H", 1000)))
            with trio.fail_after(5):
                ack = await raw.recv_json()
                frame = await raw.recv_frame()
        finally:
            await raw.aclose()
    assert [(a["type"], a.get("ref")) for a in answers] == [("welcome", None), ("ack", 0), ("ack", 1)]
    assert (ack["type"], ack["ref"], ack["offset"]) == ("ack", 2, 3)
    assert frame is not None and frame.close_code == 1000


async def test_a_refused_handshake_never_reads_the_frames_behind_it() -> None:
    async with running_server() as server:
        server.draining = True  # refused with 503
        raw = await RawSocket.open(server.port)
        try:
            await raw.send(upgrade_request() + publish(0))
            response = await raw.read_response()
        finally:
            await raw.aclose()
        assert response is not None and response.status == 503
        assert server.hub.get("pipe.1") is None  # the publish behind it was not handled
