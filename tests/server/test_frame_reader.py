"""The server's frame reader (scan_client_frames fast path, wsproto for the rest) over
loopback, with a raw client that writes masked frames itself so the tests decide where
the byte boundaries fall: many frames in one write, frames cut into tiny chunks, control
frames between data frames, and a switch to wsproto (fragments, protocol errors) in the
middle of a write.
"""

from __future__ import annotations

import json
import os
import random
import struct
from typing import Any

import msgpack
import trio

from .conftest import MSGPACK_PROTO, open_client, running_server
from .test_bad_input import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, Frame, RawSocket, raw_ws

N = 300


def masked(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    """One client frame, bytes only (nothing sent)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 0x10000:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    body = (int.from_bytes(payload, "big") ^ int.from_bytes((key * (n // 4 + 1))[:n], "big")).to_bytes(n, "big") if n else b""
    return head + key + body


def publish(i: int, channel: str = "fr", pad: str = "") -> bytes:
    return masked(OP_TEXT, json.dumps({"type": "publish", "channel": channel, "data": {"n": i, "pad": pad},
                                       "ref": i}).encode())


async def next_frame(raw: RawSocket) -> Frame:
    with trio.fail_after(10):
        frame = await raw.recv_frame()
    assert frame is not None, f"connection ended ({raw.end})"
    return frame


async def read_acks(raw: RawSocket, refs: list[Any]) -> None:
    """Read exactly one ack per ref, in this order (server pings are skipped)."""
    got = []
    while len(got) < len(refs):
        frame = await next_frame(raw)
        if frame.opcode == OP_PING:
            continue
        assert frame.opcode == OP_TEXT, frame
        msg = frame.json()
        assert msg["type"] == "ack", msg
        got.append(msg["ref"])
    assert got == refs


async def read_messages(raw: RawSocket, ns: list[int]) -> None:
    got = []
    while len(got) < len(ns):
        frame = await next_frame(raw)
        if frame.opcode == OP_PING:
            continue
        msg = frame.json()
        assert msg["type"] == "message", msg
        got.append(msg["data"]["n"])
    assert got == ns


async def subscribed(server: Any, channel: str = "fr") -> RawSocket:
    sub = await raw_ws(server)
    await sub.send(masked(OP_TEXT, json.dumps({"type": "subscribe", "channel": channel}).encode()))
    answer = (await next_frame(sub)).json()
    assert answer["type"] == "subscribed", answer
    return sub


async def expect_close(raw: RawSocket, code: int, sub: RawSocket, published: list[int]) -> None:
    """Answers to every valid publish (in order), then a close frame with ``code``; the
    subscriber gets every valid publish of the write, in order, and nothing after.

    (The connection writes what it has queued before the reader answers with a close:
    ``Connection._write_before_close``.)
    """
    frames = []
    while not frames or frames[-1].opcode != OP_CLOSE:
        frame = await next_frame(raw)  # fails when the connection ends without a close frame
        if frame.opcode != OP_PING:
            frames.append(frame)
    assert frames[-1].close_code == code, frames[-1]
    await raw.send(masked(OP_CLOSE, frames[-1].payload[:2]))  # finish the close handshake
    refs = [f.json()["ref"] for f in frames[:-1]]
    assert refs == published, refs
    got: list[int] = []
    while len(got) < len(published):
        frame = await next_frame(sub)
        if frame.opcode == OP_TEXT:
            got.append(frame.json()["data"]["n"])
    with trio.move_on_after(0.3):  # anything more would be too much
        while True:
            frame = await next_frame(sub)
            if frame.opcode == OP_TEXT:
                got.append(frame.json()["data"]["n"])
    assert got[: len(published)] == published, got
    assert got == published, got


async def test_300_publishes_in_one_write() -> None:
    with trio.fail_after(20):
        async with running_server() as server:
            sub = await subscribed(server)
            pub = await raw_ws(server)
            try:
                await pub.send(b"".join(publish(i, pad="é" * (i % 70)) for i in range(N)))
                await read_acks(pub, list(range(N)))
                await read_messages(sub, list(range(N)))
            finally:
                await pub.aclose()
                await sub.aclose()


async def test_300_publishes_in_tiny_chunks() -> None:
    rng = random.Random(1234)
    with trio.fail_after(30):
        async with running_server() as server:
            sub = await subscribed(server)
            pub = await raw_ws(server)
            try:
                data = b"".join(publish(i, pad="x" * rng.choice([0, 1, 100, 130, 200])) for i in range(N))
                pos = 0
                while pos < len(data):
                    step = rng.randint(1, 7)
                    await pub.send(data[pos:pos + step])
                    pos += step
                    if rng.random() < 0.05:
                        await trio.sleep(0.001)  # let the server see a header split
                await read_acks(pub, list(range(N)))
                await read_messages(sub, list(range(N)))
            finally:
                await pub.aclose()
                await sub.aclose()


async def test_ping_between_publishes_in_one_write() -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            raw = await raw_ws(server)
            try:
                data = (publish(1) + publish(2) + masked(OP_PING, b"between-1") + publish(3)
                        + masked(OP_PING, b"") + masked(OP_PING, b"p" * 125) + publish(4))
                await raw.send(data)
                seen: list[Any] = []
                while len(seen) < 7:
                    frame = await next_frame(raw)
                    if frame.opcode == OP_PONG:
                        seen.append(("pong", frame.payload))
                    elif frame.opcode == OP_TEXT:
                        seen.append(("ack", frame.json()["ref"]))
                    else:
                        assert frame.opcode == OP_PING, frame
                # Pongs are written by the reader at once and may overtake the acks, which
                # wait for the connection's writer (as before the fast path); each kind
                # must still be complete and in order.
                assert [v for k, v in seen if k == "ack"] == [1, 2, 3, 4], seen
                assert [v for k, v in seen if k == "pong"] == [b"between-1", b"", b"p" * 125], seen
            finally:
                await raw.aclose()


async def test_client_pongs_are_accepted_among_publishes() -> None:
    """Unsolicited pongs and the answer to a server heartbeat ping, in the same write as
    publishes: accepted silently, and the heartbeat does not time the connection out."""
    with trio.fail_after(15):
        async with running_server(heartbeat=0.15, heartbeat_timeout=0.3) as server:
            raw = await raw_ws(server)
            try:
                await raw.send(publish(1) + masked(OP_PONG, b"unsolicited") + publish(2))
                await read_acks(raw, [1, 2])
                answered = 0
                ref = 3
                with trio.move_on_after(1.0):
                    while True:
                        frame = await next_frame(raw)
                        if frame.opcode == OP_PING:
                            await raw.send(publish(ref) + masked(OP_PONG, frame.payload) + publish(ref + 1))
                            answered += 1
                            ref += 2
                        else:
                            assert frame.opcode == OP_TEXT, frame
                            assert frame.json()["type"] == "ack", frame
                assert answered >= 3
                assert raw.end is None, "the server closed a connection that answered its pings"
                await raw.send(publish(999))
                frame = await next_frame(raw)
                while frame.opcode == OP_PING or frame.json().get("ref") != 999:
                    frame = await next_frame(raw)
            finally:
                await raw.aclose()


async def test_fragmented_message_in_the_middle_of_a_write() -> None:
    with trio.fail_after(15):
        async with running_server() as server:
            sub = await subscribed(server)
            raw = await raw_ws(server)
            try:
                body = json.dumps({"type": "publish", "channel": "fr", "data": {"n": 50}, "ref": 50}).encode()
                data = (b"".join(publish(i) for i in range(50))
                        + masked(OP_TEXT, body[:10], fin=False) + masked(OP_PING, b"mid")
                        + masked(OP_CONT, body[10:20], fin=False) + masked(OP_CONT, body[20:])
                        + b"".join(publish(i) for i in range(51, 100)))
                await raw.send(data)
                refs: list[Any] = []
                pongs = []
                while len(refs) < 100:
                    frame = await next_frame(raw)
                    if frame.opcode == OP_PONG:
                        pongs.append((len(refs), frame.payload))
                    elif frame.opcode == OP_TEXT:
                        refs.append(frame.json()["ref"])
                assert refs == list(range(100))
                assert [p for _, p in pongs] == [b"mid"]  # pongs may overtake acks
                await read_messages(sub, list(range(100)))
                # still working afterwards, in small and large writes
                await raw.send(publish(100))
                await read_acks(raw, [100])
                await raw.send(b"".join(publish(i) for i in range(101, 131)))
                await read_acks(raw, list(range(101, 131)))
            finally:
                await raw.aclose()
                await sub.aclose()


async def test_invalid_utf8_after_valid_publishes_closes_1007() -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as other:
            sub = await subscribed(server)
            raw = await raw_ws(server)
            try:
                await raw.send(b"".join(publish(i) for i in range(20))
                               + masked(OP_TEXT, b'{"type": "ping", "x": "\xff"}') + publish(99))
                await expect_close(raw, 1007, sub, list(range(20)))
            finally:
                await raw.aclose()
            assert (await other.request({"type": "ping", "ref": 1})) == {"type": "pong", "ref": 1}


async def test_oversize_after_valid_publishes_closes_1009() -> None:
    with trio.fail_after(10):
        async with running_server(max_message_size=1000, send_queue_size=4000) as server:
            sub = await subscribed(server)
            raw = await raw_ws(server)
            try:
                await raw.send(b"".join(publish(i) for i in range(20))
                               + publish(98, pad="x" * 1001) + publish(99))
                await expect_close(raw, 1009, sub, list(range(20)))
            finally:
                await raw.aclose()


async def test_just_under_max_message_size_is_answered() -> None:
    with trio.fail_after(10):
        async with running_server(max_message_size=1000, send_queue_size=4000) as server:
            raw = await raw_ws(server)
            try:
                base = len(publish(0)) - 6
                exact = publish(1, pad="x" * (1000 - base))
                assert len(exact) - 8 == 1000  # 2-byte extended length + 4-byte mask + 2
                await raw.send(publish(0) + exact + publish(2))
                await read_acks(raw, [0, 1, 2])
            finally:
                await raw.aclose()


async def test_unmasked_frame_after_valid_publishes_closes_1002() -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            sub = await subscribed(server)
            raw = await raw_ws(server)
            try:
                frame = json.dumps({"type": "publish", "channel": "fr", "data": 1, "ref": 98}).encode()
                await raw.send(b"".join(publish(i) for i in range(20)) + masked(OP_TEXT, frame, mask=False)
                               + publish(99))
                await expect_close(raw, 1002, sub, list(range(20)))
            finally:
                await raw.aclose()


async def test_msgpack_binary_frames_in_one_write() -> None:
    with trio.fail_after(15):
        async with running_server() as server:
            raw = await RawSocket.open(server.port)
            try:
                await raw.handshake(subprotocols=(MSGPACK_PROTO,))
                welcome = await next_frame(raw)
                assert welcome.opcode == OP_BINARY and msgpack.unpackb(welcome.payload)["type"] == "welcome"
                data = b"".join(masked(OP_BINARY, msgpack.packb(
                    {"type": "publish", "channel": "mp", "data": {"n": i, "s": "é" * (i % 90)}, "ref": i},
                    use_bin_type=True)) for i in range(N))
                await raw.send(data)
                refs = []
                while len(refs) < N:
                    frame = await next_frame(raw)
                    if frame.opcode == OP_PING:
                        continue
                    assert frame.opcode == OP_BINARY, frame
                    msg = msgpack.unpackb(frame.payload)
                    assert msg["type"] == "ack", msg
                    refs.append(msg["ref"])
                assert refs == list(range(N))
            finally:
                await raw.aclose()
