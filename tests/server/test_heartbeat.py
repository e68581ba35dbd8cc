"""Heartbeats: the server pings every ``heartbeat`` seconds and closes a connection whose
pong does not come within ``heartbeat_timeout``; clients that answer stay connected.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
import trio
import trio_websocket

from .conftest import MSGPACK_PROTO, open_client, running_server
from .test_bad_input import OP_CLOSE, OP_PING, OP_PONG, Frame, RawSocket, assert_usable, raw_ws

FAST = {"heartbeat": 0.2, "heartbeat_timeout": 0.3}


@pytest.mark.parametrize("answers_close", [True, False], ids=["answers-close", "silent"])
async def test_client_that_never_answers_pings_is_closed(answers_close: bool) -> None:
    with trio.fail_after(15):
        async with running_server(**FAST) as server, open_client(server) as other:
            raw = await RawSocket.open(server.port)
            try:
                await raw.handshake()
                first = await raw.recv_frame()
                assert first is not None and json.loads(first.payload)["heartbeat"] == 0.2
                frames: list[Frame] = []
                # one ping after 0.2 s, no pong within 0.3 s: the close comes well within 1 s
                # (the bound is loose on purpose: a loaded machine is not a failure)
                with trio.fail_after(2):
                    while not frames or frames[-1].opcode != OP_CLOSE:
                        frame = await raw.recv_frame()
                        assert frame is not None, f"TCP ended ({raw.end}) before a close frame: {frames}"
                        frames.append(frame)
                if answers_close:
                    await raw.send_close(frames[-1].close_code or 1000)
                # then the server ends the TCP connection (after its close grace at most)
                with trio.fail_after(6):
                    rest = await raw.frames_to_end()
                assert raw.end in ("eof", "reset")
            finally:
                await raw.aclose()
            assert [f.opcode for f in frames[:-1]] and all(f.opcode == OP_PING for f in frames[:-1]), frames
            close = frames[-1]
            assert close.close_code == 1011, close
            assert "heartbeat" in close.close_reason, close
            assert not [f for f in rest if f.opcode not in (OP_PING, OP_CLOSE)], rest
            await assert_usable(other)


async def test_raw_client_that_answers_pings_stays_connected() -> None:
    with trio.fail_after(15):
        async with running_server(**FAST) as server:
            raw = await raw_ws(server)
            try:
                pings = 0
                while pings < 6:  # over a second of heartbeats
                    frame = await raw.recv_frame()
                    assert frame is not None, f"connection ended ({raw.end})"
                    assert frame.opcode == OP_PING, frame
                    pings += 1
                    await raw.send_frame(OP_PONG, frame.payload)
                await raw.send_json({"type": "ping", "ref": "alive"})
                assert await raw.recv_json() == {"type": "pong", "ref": "alive"}
            finally:
                await raw.aclose()


async def test_websockets_client_stays_connected_and_keeps_working() -> None:
    with trio.fail_after(15):
        async with running_server(**FAST) as server, open_client(server) as c, open_client(server) as pub:
            assert c.welcome["heartbeat"] == 0.2
            await c.subscribe("hb")
            # several heartbeat periods, each far longer than the timeout, without a close
            await c.expect_silence(1.2)
            await assert_usable(c)
            await pub.publish("hb", "still here")
            assert await c.recv() == {"type": "message", "channel": "hb", "offset": 1, "data": "still here"}


async def test_trio_websocket_client_stays_connected() -> None:
    with trio.fail_after(15):
        async with running_server(**FAST) as server, \
                trio_websocket.open_websocket_url(server.url) as ws:
            assert json.loads(await ws.get_message())["heartbeat"] == 0.2
            with trio.move_on_after(1.2):
                message = await ws.get_message()
                raise AssertionError(f"expected nothing, got {message!r}")
            await ws.send_message('{"type": "ping", "ref": 1}')
            assert json.loads(await ws.get_message()) == {"type": "pong", "ref": 1}


@pytest.mark.parametrize("overrides, expected", [
    ({}, 25.0),
    ({"heartbeat": 0.2, "heartbeat_timeout": 0.3}, 0.2),
    ({"heartbeat": 7.5}, 7.5),
    ({"heartbeat": 60.0}, 60.0),
], ids=["default", "0.2", "7.5", "60"])
@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_welcome_carries_the_configured_heartbeat(overrides: dict[str, Any], expected: float,
                                                        encoding: str) -> None:
    with trio.fail_after(10):
        async with running_server(**overrides) as server, open_client(server, encoding) as c:
            assert c.welcome["heartbeat"] == expected
            assert isinstance(c.welcome["heartbeat"], (int, float)) and not isinstance(c.welcome["heartbeat"], bool)
        # and a raw client sees the same in the first frame it gets
        async with running_server(**overrides) as server:
            raw = await RawSocket.open(server.port)
            try:
                await raw.handshake(subprotocols=(MSGPACK_PROTO,) if encoding == "msgpack" else ())
                frame = await raw.recv_frame()
                assert frame is not None
                message = msgpack.unpackb(frame.payload) if encoding == "msgpack" else json.loads(frame.payload)
                assert message["type"] == "welcome" and message["heartbeat"] == expected, message
            finally:
                await raw.aclose()
