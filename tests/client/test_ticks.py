"""The Python client with ``tick_ms``: it asks for ticks on the URL and unpacks the arrays, so
the application sees the same messages, answers and events as without ticks."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from relay.client import (
    Ack,
    ClientClosed,
    Connected,
    Lost,
    Message,
    MessagesSkipped,
    RequestFailed,
    connect,
)

from .conftest import Recorder, connection_of, running_proxy, running_server

FAST = {"min_backoff": 0.01, "max_backoff": 0.05}


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_messages_acks_and_errors_come_through_in_order(encoding: str) -> None:
    with trio.fail_after(15):
        async with running_server() as server, running_proxy(server.port) as proxy, \
                connect(proxy.url, encoding=encoding, tick_ms=20) as c, connect(server.url) as pub:
            await c.wait_connected()
            assert c.tick_ms == 20
            head = proxy.heads[0].decode("latin-1")
            assert head.startswith("GET /ws?tick_ms=20 HTTP/1.1"), head
            conn = connection_of(server, c.session)
            assert conn.tick_ms == 20 and conn.outbox.batched
            sub = await c.subscribe("feed")
            # 50 messages in one scheduling pass: they leave in one tick, as one array.
            now = trio.current_time()
            for i in range(50):
                server.hub.publish("feed", {"i": i, "text": "ü€" * i}, now)
            got = [await sub.__anext__() for _ in range(50)]
            assert got == [Message("feed", i + 1, {"i": i, "text": "ü€" * i}, sub.epoch) for i in range(50)]
            # Answers inside arrays still find their requests.
            acks = await _publish_many(c, "own", list(range(20)))
            assert [a.offset for a in acks] == list(range(1, 21))
            with pytest.raises(RequestFailed) as info:
                await c.subscribe("bad name")
            assert info.value.code == "bad_request"
            ack = await pub.publish("feed", "last")
            assert await sub.__anext__() == Message("feed", ack.offset, "last", ack.epoch)


async def _publish_many(c: Any, channel: str, values: list[Any]) -> list[Ack]:
    pending = [c.publish_nowait(channel, v) for v in values]
    return [await p.wait_ack() for p in pending]


async def test_state_channel_sees_only_newer_values_and_ends_on_the_newest() -> None:
    rec = Recorder()
    with trio.fail_after(15):
        async with running_server(channels=[{"pattern": "px.*", "mode": "state"}]) as server, \
                connect(server.url, tick_ms=100, on_event=rec) as c:
            await c.wait_connected()
            sub = await c.subscribe("px.btc")
            now = trio.current_time()
            for px in range(1, 31):
                server.hub.publish("px.btc", {"px": px}, now)
                if px % 10 == 0:
                    await trio.sleep(0.25)  # the next ten are another tick's
                    now = trio.current_time()
            seen = []
            while not seen or seen[-1] != 30:
                seen.append((await sub.__anext__()).data["px"])
            # One value per tick: the newest of each burst, never an older one after it.
            assert seen == [10, 20, 30]
            assert sub.statistics().duplicates == 0 and not rec.of(Lost)


async def test_recovery_after_a_reconnect() -> None:
    rec = Recorder()
    with trio.fail_after(15):
        async with running_server() as server, connect(server.url, tick_ms=30, on_event=rec, **FAST) as c, \
                connect(server.url) as pub:
            await c.wait_connected()
            sub = await c.subscribe("r")
            for i in range(5):
                await pub.publish("r", i)
            assert [(await sub.__anext__()).data for _ in range(5)] == list(range(5))
            connection_of(server, c.session).kick(4002, "slow consumer: send queue overflowed")
            for i in range(5, 10):
                await pub.publish("r", i)
            await rec.wait_for(Connected, 2)
            for i in range(10, 15):
                await pub.publish("r", i)
            got = [await sub.__anext__() for _ in range(10)]
            assert [m.data for m in got] == list(range(5, 15))
            assert [m.offset for m in got] == list(range(6, 16))
            assert sub.statistics().duplicates == 0 and not rec.of(Lost)
            assert connection_of(server, c.session).tick_ms == 30  # asked again on reconnect


async def test_gap_raises_in_stream_order() -> None:
    with trio.fail_after(30):
        async with running_server(send_queue_size=4096,
                                  channels=[{"pattern": "d.*", "slow_consumer": "drop"}]) as server, \
                connect(server.url, tick_ms=50) as c:
            await c.wait_connected()
            sub = await c.subscribe("d.x")
            now = trio.current_time()
            for i in range(100):
                server.hub.publish("d.x", {"i": i, "pad": "x" * 200}, now)
            got: list[int] = []
            with pytest.raises(MessagesSkipped) as info:
                while True:
                    got.append((await sub.__anext__()).offset)
            assert got == list(range(1, len(got) + 1)) and info.value.first == len(got) + 1
            assert info.value.last == 100


async def test_server_heartbeats_keep_a_ticked_client_connected() -> None:
    rec = Recorder()
    with trio.fail_after(15):
        async with running_server(heartbeat=0.1, heartbeat_timeout=0.3) as server, \
                connect(server.url, tick_ms=50, on_event=rec, ping_timeout=0.5) as c:
            await c.wait_connected()
            conn = connection_of(server, c.session)
            await trio.sleep(1.2)  # a dozen server pings, and the client's own keepalive
            assert c.state.value == "connected" and len(rec.of(Connected)) == 1
            assert connection_of(server, c.session) is conn
            assert await c.publish("x", 1) == Ack("x", 1, (await c.publish("x", 2)).epoch)


async def test_invalid_tick_ms() -> None:
    for bad in (0, -5, True, 2.5, "20"):
        with pytest.raises(ValueError, match="tick_ms"):
            async with connect("ws://127.0.0.1:1/ws", tick_ms=bad):  # type: ignore[arg-type]
                pass
    with pytest.raises(ValueError, match="given twice"):
        async with connect("ws://127.0.0.1:1/ws?tick_ms=20", tick_ms=20):
            pass


async def test_tick_ms_the_server_refuses_stops_the_client() -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            with pytest.raises(ClientClosed) as info:
                async with connect(server.url, tick_ms=5) as c:
                    await c.wait_connected()
            assert info.value.http_status == 400
            assert "tick_ms" in str(info.value) and "10 to 1000" in str(info.value)
