"""Ticks (``?tick_ms=N``) end to end, over loopback with real clients.

A ticked connection gets, after its ``welcome``, one frame per tick holding an array of
the envelopes queued during the tick, in order; a state channel keeps only its newest
value per tick; pings stay raw control frames; other connections are not affected.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
import trio

from .conftest import MSGPACK_PROTO, Client, open_client, running_server
from .test_bad_input import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawSocket

STATE = {"pattern": "state.*", "mode": "state"}


async def recv_frame(client: Client, timeout: float = 5.0) -> Any:
    """Return the next data frame decoded (an array on ticked connections)."""
    with trio.fail_after(timeout):
        raw = await client.ws.recv()
    if client.encoding == "msgpack":
        assert isinstance(raw, bytes)
        return msgpack.unpackb(raw)
    assert isinstance(raw, str)
    return json.loads(raw)


async def recv_arrays(client: Client, count: int, timeout: float = 10.0) -> list[list[dict[str, Any]]]:
    """Read array frames until they hold ``count`` envelopes in all."""
    arrays: list[list[dict[str, Any]]] = []
    with trio.fail_after(timeout):
        while sum(map(len, arrays)) < count:
            frame = await recv_frame(client)
            assert isinstance(frame, list) and frame, f"expected a non-empty array, got {frame!r}"
            arrays.append(frame)
    return arrays


async def publish_burst(publisher: Client, channel: str, values: list[Any]) -> None:
    """Send ``values`` as publishes without waiting in between, then read their acks."""
    for v in values:
        await publisher.send({"type": "publish", "channel": channel, "data": v, "ref": v})
    for v in values:
        ack = await publisher.recv()
        assert ack == {**ack, "type": "ack", "ref": v}, ack


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_stream_subscriber_gets_every_message_in_order_in_fewer_frames(encoding: str) -> None:
    bursts, per_burst = 6, 20
    with trio.fail_after(30):
        async with running_server() as server, \
                open_client(server, encoding, uri_path="/ws?tick_ms=50") as ticked, \
                open_client(server, encoding) as plain, open_client(server) as publisher:
            assert ticked.welcome["tick_ms"] == 50 and "tick_ms" not in plain.welcome
            await ticked.send({"type": "subscribe", "channel": "feed", "ref": 1})
            [[subscribed]] = await recv_arrays(ticked, 1)
            assert subscribed["type"] == "subscribed" and subscribed["ref"] == 1
            await plain.subscribe("feed")
            sent = []
            for b in range(bursts):
                await publish_burst(publisher, "feed", list(range(b * per_burst, (b + 1) * per_burst)))
                sent.extend(range(b * per_burst, (b + 1) * per_burst))
                await trio.sleep(0.2)  # four ticks: the next burst is another tick's
            arrays = await recv_arrays(ticked, len(sent))
            got = [m for array in arrays for m in array]
            assert [m["data"] for m in got] == sent
            assert [m["offset"] for m in got] == list(range(1, len(sent) + 1))
            assert all(m["type"] == "message" and m["channel"] == "feed" for m in got)
            assert len(arrays) < len(sent)
            assert all(len(array) <= per_burst for array in arrays), [len(a) for a in arrays]
            # The subscriber without ticks is not affected: one object per frame, all of them.
            for n in sent:
                message = await plain.recv()
                assert message["type"] == "message" and message["data"] == n
            await ticked.expect_silence(0.15)  # a tick with nothing queued sends nothing


async def test_state_channel_tick_holds_only_the_newest_value() -> None:
    with trio.fail_after(30):
        async with running_server(channels=[STATE]) as server, \
                open_client(server, uri_path="/ws?tick_ms=200") as ticked, \
                open_client(server) as plain, open_client(server) as publisher:
            await ticked.send({"type": "subscribe", "channel": "state.price", "ref": 1})
            await ticked.send({"type": "subscribe", "channel": "trades", "ref": 2})
            first = await recv_arrays(ticked, 2)
            assert [m["type"] for a in first for m in a] == ["subscribed", "subscribed"]
            await plain.subscribe("state.price")
            received: list[dict[str, Any]] = []
            arrays: list[list[dict[str, Any]]] = []
            for round_ in range(3):
                # A burst of state values interleaved with stream messages, well inside a tick.
                for i in range(10):
                    n = round_ * 10 + i
                    await publisher.send({"type": "publish", "channel": "state.price", "data": n})
                    await publisher.send({"type": "publish", "channel": "trades", "data": n})
                with trio.fail_after(5):
                    while not any(m["channel"] == "state.price" and m["data"] == round_ * 10 + 9
                                  for m in received):
                        array = await recv_frame(ticked)
                        assert isinstance(array, list)
                        arrays.append(array)
                        received.extend(array)
            for array in arrays:
                state = [m for m in array if m["channel"] == "state.price"]
                assert len(state) <= 1, f"two values of one state channel in a tick: {array}"
            state_values = [m["data"] for m in received if m["channel"] == "state.price"]
            assert state_values == sorted(state_values) and state_values[-1] == 29
            assert len(state_values) < 30  # values superseded within their tick
            offsets = [m["offset"] for m in received if m["channel"] == "state.price"]
            assert offsets == sorted(offsets)
            # The stream channel in the same arrays keeps every message, in order.
            assert [m["data"] for m in received if m["channel"] == "trades"] == list(range(30))
            # A subscriber without ticks keeps up and gets every value.
            assert [(await plain.recv())["data"] for _ in range(30)] == list(range(30))


async def test_state_snapshot_and_a_newer_value_in_one_tick() -> None:
    """The current value sent on subscribe is replaced by a newer one of the same tick."""
    with trio.fail_after(15):
        async with running_server(channels=[STATE]) as server, \
                open_client(server, uri_path="/ws?tick_ms=300") as ticked, \
                open_client(server) as publisher:
            await publisher.publish("state.x", "old")
            await ticked.send({"type": "subscribe", "channel": "state.x", "ref": 1})
            await trio.sleep(0.01)
            await publisher.publish("state.x", "new")
            got = [m for a in await recv_arrays(ticked, 2) for m in a]
            assert [(m["type"], m.get("data")) for m in got] == [("subscribed", None), ("message", "new")]
            assert got[1]["offset"] == 2


async def test_answers_and_errors_arrive_inside_arrays_in_order() -> None:
    with trio.fail_after(15):
        async with running_server() as server, \
                open_client(server, "msgpack", uri_path="/ws?tick_ms=100") as ticked:
            await ticked.send({"type": "publish", "channel": "c", "data": 1, "ref": 1})
            await ticked.send({"type": "nonsense", "ref": 2})
            await ticked.send({"type": "publish", "channel": "c", "data": 2, "ref": 3})
            await ticked.send({"type": "subscribe", "channel": "", "ref": 4})
            await ticked.send({"type": "ping", "ref": 5})
            got = [m for a in await recv_arrays(ticked, 5) for m in a]
            assert [(m["type"], m["ref"]) for m in got] == [
                ("ack", 1), ("error", 2), ("ack", 3), ("error", 4), ("pong", 5)]
            assert got[0]["offset"] == 1 and got[2]["offset"] == 2
            assert got[1]["code"] == "bad_request"


async def test_heartbeat_pings_stay_outside_the_arrays() -> None:
    with trio.fail_after(20):
        async with running_server(heartbeat=0.15, heartbeat_timeout=0.5) as server, \
                open_client(server) as publisher:
            raw = await RawSocket.open(server.port)
            try:
                await raw.handshake(path="/ws?tick_ms=20")
                welcome = await raw.recv_frame()
                assert welcome is not None and json.loads(welcome.payload)["tick_ms"] == 20
                await raw.send_json({"type": "subscribe", "channel": "c", "ref": 1})
                pings = arrays = 0
                published = 0
                envelopes: list[dict[str, Any]] = []
                with trio.fail_after(10):
                    while pings < 5:
                        if published < 40:
                            await publisher.publish("c", published)
                            published += 1
                        with trio.move_on_after(0.05):
                            frame = await raw.recv_frame()
                            assert frame is not None, f"connection ended ({raw.end})"
                            if frame.opcode == OP_PING:
                                pings += 1
                                await raw.send_frame(OP_PONG, frame.payload)
                                continue
                            assert frame.opcode == OP_TEXT and frame.fin
                            value = json.loads(frame.payload)
                            assert isinstance(value, list), value
                            arrays += 1
                            envelopes.extend(value)
                    while len(envelopes) < published + 1:
                        frame = await raw.recv_frame()
                        assert frame is not None
                        if frame.opcode == OP_PING:
                            await raw.send_frame(OP_PONG, frame.payload)
                            continue
                        envelopes.extend(json.loads(frame.payload))
                assert envelopes[0]["type"] == "subscribed"
                assert [m["data"] for m in envelopes[1:]] == list(range(published))
                assert arrays > 0 and pings == 5  # answered: still connected after 5 heartbeats
            finally:
                await raw.aclose()


@pytest.mark.parametrize("query", [
    "tick_ms=abc", "tick_ms=5", "tick_ms=9", "tick_ms=1001", "tick_ms=", "tick_ms=10.5",
    "tick_ms=-10", "tick_ms=%D9%A3%D9%A0", "tick_ms=20&tick_ms=30", "tick_ms=0",
], ids=lambda q: q.replace("%", "pct"))
async def test_bad_tick_ms_is_refused_at_the_handshake(query: str) -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            raw = await RawSocket.open(server.port)
            try:
                response = await raw.handshake(path=f"/ws?{query}", expect=400)
            finally:
                await raw.aclose()
            body = json.loads(response.body)
            assert body["error"] == "bad_request"
            assert "tick_ms" in body["message"] and "10 to 1000" in body["message"], body


@pytest.mark.parametrize("tick_ms", [10, 1000])
async def test_tick_ms_bounds_are_accepted(tick_ms: int) -> None:
    with trio.fail_after(10):
        async with running_server() as server, \
                open_client(server, uri_path=f"/ws?tick_ms={tick_ms}") as ticked:
            assert ticked.welcome["tick_ms"] == tick_ms
            await ticked.send({"type": "ping", "ref": 1})
            assert await recv_frame(ticked) == [{"type": "pong", "ref": 1}]


def _ticker_tasks() -> int:
    """Count the running ticker tasks in this trio run's task tree."""
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        count += task.name.endswith("._ticker")
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def test_one_ticker_task_per_distinct_interval() -> None:
    with trio.fail_after(15):
        async with running_server() as server:
            assert _ticker_tasks() == 0
            async with open_client(server, uri_path="/ws?tick_ms=20") as a, \
                    open_client(server, uri_path="/ws?tick_ms=20") as b, \
                    open_client(server, "msgpack", uri_path="/ws?tick_ms=50") as c, \
                    open_client(server) as d:
                assert _ticker_tasks() == 2
                for client in (a, b, c):
                    await client.send({"type": "ping", "ref": 7})
                    assert await recv_frame(client) == [{"type": "pong", "ref": 7}]
                assert await d.request({"type": "ping", "ref": 7}) == {"type": "pong", "ref": 7}
            with trio.fail_after(5):
                while _ticker_tasks():  # each ends once its last connection has gone
                    await trio.sleep(0.02)


async def test_msgpack_ticked_frames_are_binary_arrays() -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            raw = await RawSocket.open(server.port)
            try:
                await raw.handshake(path="/ws?tick_ms=30", subprotocols=(MSGPACK_PROTO,))
                welcome = await raw.recv_frame()
                assert welcome is not None and welcome.opcode == OP_BINARY
                assert msgpack.unpackb(welcome.payload)["tick_ms"] == 30
                await raw.send_frame(OP_BINARY, msgpack.packb({"type": "ping", "ref": "x"}))
                await raw.send_frame(OP_BINARY, msgpack.packb({"type": "ping", "ref": "y"}))
                frame = await raw.recv_frame()
                assert frame is not None and frame.opcode == OP_BINARY
                got = msgpack.unpackb(frame.payload)
                if len(got) == 1:  # the two pings straddled a tick
                    frame = await raw.recv_frame()
                    assert frame is not None
                    got += msgpack.unpackb(frame.payload)
                assert got == [{"type": "pong", "ref": "x"}, {"type": "pong", "ref": "y"}]
            finally:
                await raw.aclose()


async def test_drain_sends_what_waits_for_the_tick_then_closes() -> None:
    with trio.fail_after(15):
        async with running_server(drain_window=0.1) as server:
            raw = await RawSocket.open(server.port)
            try:
                await raw.handshake(path="/ws?tick_ms=1000")
                assert await raw.recv_frame() is not None  # welcome
                await raw.send_json({"type": "subscribe", "channel": "c", "ref": 1})
                frame = await raw.recv_frame()
                assert frame is not None and [m["type"] for m in json.loads(frame.payload)] == ["subscribed"]
                now = trio.current_time()
                for i in range(3):
                    server.hub.publish("c", i, now)
                frames = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(server.drain)
                    while not frames or frames[-1].opcode != OP_CLOSE:
                        frame = await raw.recv_frame()
                        assert frame is not None, f"connection ended ({raw.end}) before a close frame"
                        frames.append(frame)
                    await raw.send_close(1001)
            finally:
                await raw.aclose()
            assert [f.opcode for f in frames] == [OP_TEXT, OP_CLOSE], frames
            assert [m["data"] for m in json.loads(frames[0].payload)] == [0, 1, 2]
            assert frames[1].close_code == 1001
