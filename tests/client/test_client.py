"""The Python client against a real in-process server: subscribe, publish, acks, errors,
state channels, backpressure, events, timeouts."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import trio

import relay.client as rc
from relay.client import (
    Ack,
    AlreadySubscribed,
    ClientClosed,
    ClientState,
    Closed,
    Connected,
    Connecting,
    Disconnected,
    InvalidData,
    Lost,
    Message,
    MessagesSkipped,
    Poke,
    Position,
    Reconnecting,
    RecoveryLost,
    RequestFailed,
    RequestTimeout,
    Subscribed,
    connect,
)

from .conftest import Recorder, connection_of, running_proxy, running_server

ENCODINGS = ["json", "msgpack"]
FAST = {"min_backoff": 0.01, "max_backoff": 0.05}


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_subscribe_publish_ack(encoding: str) -> None:
    with trio.fail_after(10):
        async with running_server() as server, \
                connect(server.url, encoding=encoding) as a, connect(server.url, encoding="json") as b:
            await a.wait_connected()
            assert a.state is ClientState.CONNECTED and a.session in server.connections
            assert server.connections[a.session].codec.name == encoding
            sub = await a.subscribe("chat.1")
            assert sub.epoch is not None and sub.position == Position(sub.epoch, 0)
            values: list[Any] = [{"text": "hi", "n": 1}, [1, 2.5, None, True], "ü", 0, None, 2**63]
            acks = [await b.publish("chat.1", v) for v in values]
            assert acks == [Ack("chat.1", n, sub.epoch) for n in range(1, 7)]
            got = [await sub.__anext__() for _ in values]
            assert got == [Message("chat.1", n, v, sub.epoch) for n, v in enumerate(values, 1)]
            # a publisher subscribed to its own channel gets its message too
            ack = await a.publish("chat.1", {"own": True})
            assert (await sub.__anext__()) == Message("chat.1", ack.offset, {"own": True}, ack.epoch)
            assert sub.statistics().delivered == 7 and sub.statistics().buffered == 0


async def test_subscribe_while_connecting_then_receive() -> None:
    with trio.fail_after(10):
        async with running_server() as server, connect(server.url) as c:
            sub = await c.subscribe("a")  # not connected yet: returns at once
            assert c.state is ClientState.CONNECTING and sub.epoch is None
            await c.wait_connected()
            ack = await c.publish("a", 1)
            assert await sub.__anext__() == Message("a", 1, 1, ack.epoch)


async def test_subscribe_since_recovers_history() -> None:
    with trio.fail_after(10):
        async with running_server() as server, connect(server.url) as c:
            acks = [await c.publish("h", i) for i in range(5)]
            epoch = acks[0].epoch
            await c.wait_connected()
            sub = await c.subscribe("h", since=f"{epoch}:2")
            assert [(m.offset, m.data) for m in [await sub.__anext__() for _ in range(3)]] == [(3, 2), (4, 3), (5, 4)]
            old = await c.subscribe("h.other", since=("nope", 3))
            with pytest.raises(RecoveryLost) as info:
                await old.__anext__()
            assert (info.value.old_epoch, info.value.old_offset, info.value.new_offset) == ("nope", 3, 0)


async def test_bad_requests_raise_request_failed() -> None:
    with trio.fail_after(10):
        async with running_server(channels=[{"pattern": "ro.*", "client_publish": False}]) as server, \
                connect(server.url) as c:
            await c.wait_connected()
            with pytest.raises(RequestFailed) as info:
                await c.publish("ro.x", 1)
            assert info.value.code == "forbidden" and "client_publish" in info.value.message
            with pytest.raises(RequestFailed) as info:
                await c.subscribe("chat lobby")
            assert info.value.code == "bad_request" and info.value.channel == "chat lobby"
            # the refused subscription is forgotten: subscribing again is allowed (and refused again)
            with pytest.raises(RequestFailed):
                await c.subscribe("chat lobby")
            assert c.statistics().subscriptions == 0
            assert c.state is ClientState.CONNECTED  # errors do not end the connection


async def test_refused_subscription_made_while_offline_raises_from_the_iterator() -> None:
    with trio.fail_after(10):
        async with running_server() as server, connect(server.url) as c:
            sub = await c.subscribe("bad name")
            with pytest.raises(RequestFailed, match="bad_request"):
                await sub.wait_subscribed()
            with pytest.raises(RequestFailed, match="bad_request"):
                await sub.__anext__()


@pytest.mark.parametrize("data", [b"bytes", math.nan, {1: "int key"}, 2**64, object()], ids=repr)
async def test_data_no_subscriber_could_receive_is_refused_locally(data: Any) -> None:
    with trio.fail_after(10):
        async with running_server() as server, connect(server.url) as c:
            with pytest.raises(InvalidData):
                await c.publish("a", data)
            with pytest.raises(InvalidData):
                c.publish_nowait("a", data)
            assert c.statistics().queued_publishes == 0


async def test_already_subscribed() -> None:
    with trio.fail_after(10):
        async with running_server() as server, connect(server.url) as c:
            await c.subscribe("a")
            with pytest.raises(AlreadySubscribed):
                await c.subscribe("a")


async def test_unsubscribe_stops_the_iterator_and_the_server_side() -> None:
    with trio.fail_after(10):
        async with running_server() as server, connect(server.url) as c:
            await c.wait_connected()
            async with await c.subscribe("a") as sub:
                await c.publish("a", 1)
                assert (await sub.__anext__()).data == 1
            with pytest.raises(StopAsyncIteration):
                await sub.__anext__()
            assert server.connections[c.session].subscriptions == set()  # type: ignore[index]
            again = await c.subscribe("a")  # allowed after unsubscribing
            ack = await c.publish("a", 2)
            assert await again.__anext__() == Message("a", 2, 2, ack.epoch)


async def test_state_channel_gets_the_current_value_once_across_a_reconnect() -> None:
    rec = Recorder()
    with trio.fail_after(10):
        async with running_server(channels=[{"pattern": "prices.*", "mode": "state"}]) as server, \
                connect(server.url, on_event=rec, **FAST) as c:
            await c.wait_connected()
            for px in (101, 102, 103):
                await c.publish("prices.btc", {"px": px})
            sub = await c.subscribe("prices.btc")
            assert (await sub.__anext__()).data == {"px": 103}  # the current value, at once
            connection_of(server, c.session).kick(4002, "slow consumer: send queue overflowed")
            await rec.wait_for(Connected, 2)
            ack = await c.publish("prices.btc", {"px": 104})
            nxt = await sub.__anext__()
            assert (nxt.offset, nxt.data) == (ack.offset, {"px": 104})  # 103 was not repeated
            assert sub.statistics().duplicates == 0
            assert not rec.of(Lost)


async def test_slow_application_gets_backpressure_not_loss() -> None:
    with trio.fail_after(20):
        async with running_server() as server, connect(server.url, buffer_size=2) as c, \
                connect(server.url) as pub:
            await c.wait_connected()
            sub = await c.subscribe("s")
            n = 200
            async with trio.open_nursery() as nursery:
                async def publish_all() -> None:
                    for i in range(n):
                        await pub.publish("s", i)
                nursery.start_soon(publish_all)
                got = []
                for _ in range(n):
                    got.append((await sub.__anext__()).data)
                    assert sub.statistics().buffered <= 2
                    if len(got) % 50 == 0:
                        await trio.sleep(0.05)  # a slow application
            assert got == list(range(n))


async def test_events_and_state() -> None:
    rec = Recorder()
    with trio.fail_after(10):
        async with running_server() as server:
            async with connect(server.url, on_event=rec) as c:
                stream = c.events()
                assert c.state is ClientState.CONNECTING
                await c.wait_connected()
                first = [await stream.__anext__(), await stream.__anext__()]
                assert first == [Connecting(0, server.url), Connected(c.session or "", "test")]
            assert c.state is ClientState.CLOSED
            assert await stream.__anext__() == Closed(None)
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()
            assert rec.kinds() == ["Connecting", "Connected", "Closed"]
            async with connect(server.url, on_event=rec) as c:
                ack = await c.publish("ev", 1)
                await c.subscribe("ev", since=(ack.epoch, 0))
            assert Subscribed("ev", ack.epoch, 1, True) in rec.of(Subscribed)
            with pytest.raises(ClientClosed):
                await c.publish("a", 1)
            with pytest.raises(ClientClosed):
                await c.subscribe("a")


async def test_on_recovery_lost_event_mode_continues_without_raising() -> None:
    rec = Recorder()
    with trio.fail_after(10):
        async with running_server() as server, connect(server.url, on_event=rec, on_recovery_lost="event") as c:
            sub = await c.subscribe("e", since=("gone", 7))
            ack = await c.publish("e", "x")
            assert await sub.__anext__() == Message("e", 1, "x", ack.epoch)
            (lost,) = rec.of(Lost)
            assert isinstance(lost.error, RecoveryLost) and lost.error.old_epoch == "gone"
            # a per-subscription override
            strict = await c.subscribe("f", since=("gone", 1), on_recovery_lost="raise")
            with pytest.raises(RecoveryLost):
                await strict.__anext__()


def _publish_budget() -> int:
    """Bytes to publish so that a subscriber that stopped reading surely falls behind: the
    server's socket buffer can grow to tcp_wmem's maximum, plus the client's receive buffer."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            wmem_max = int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        wmem_max = 4 * 1024 * 1024
    return 2 * wmem_max + 2 * 1024 * 1024


async def test_gap_on_a_drop_channel_is_reported_in_stream_order() -> None:
    payload = "x" * 8192
    n = _publish_budget() // len(payload)
    with trio.fail_after(60):
        async with running_server(send_queue_size=65536, max_message_size=16384,
                                  channels=[{"pattern": "ticks.*", "slow_consumer": "drop"}]) as server, \
                connect(server.url, buffer_size=1) as c:
            await c.wait_connected()
            sub = await c.subscribe("ticks.eu")
            # The application does not read yet: the client stops reading the socket, the
            # server's send queue fills up and the drop policy starts skipping.
            for i in range(1, n + 1):
                server.hub.publish("ticks.eu", {"i": i, "pad": payload}, trio.current_time())
                if i % 16 == 0:
                    await trio.sleep(0)
            skipped: list[MessagesSkipped] = []
            offsets: list[int] = []
            tail_seen = 0
            async with trio.open_nursery() as nursery:
                async def tail() -> None:
                    # Keep publishing slowly once the gap was seen: some of these arrive, so
                    # the reader knows the stream went on after the gap (one could be skipped).
                    while True:
                        server.hub.publish("ticks.eu", {"i": "tail"}, trio.current_time())
                        await trio.sleep(0.02)

                while tail_seen < 3:
                    try:
                        msg = await sub.__anext__()
                    except MessagesSkipped as exc:
                        assert exc.first == offsets[-1] + 1 and exc.epoch == sub.epoch, (exc, offsets[-3:])
                        if not skipped:
                            nursery.start_soon(tail)
                        skipped.append(exc)
                        continue
                    if offsets and msg.offset != offsets[-1] + 1:
                        assert skipped and msg.offset == skipped[-1].last + 1, (msg.offset, offsets[-1], skipped)
                    offsets.append(msg.offset)
                    tail_seen += msg.data["i"] == "tail"
                nursery.cancel_scope.cancel()
            assert skipped, "the server never dropped: publish more"
            # Every offset up to the end was delivered once or announced in a gap, in order.
            covered = sorted(offsets + [o for gap in skipped for o in range(gap.first, gap.last + 1)])
            assert covered == list(range(1, offsets[-1] + 1))
            assert c.state is ClientState.CONNECTED  # drop keeps the connection


async def test_publish_nowait_keeps_call_order() -> None:
    with trio.fail_after(10):
        async with running_server() as server, connect(server.url) as c:
            pending = [c.publish_nowait("o", i) for i in range(50)]
            acks = [await p.wait_ack() for p in pending]
            assert [a.offset for a in acks] == list(range(1, 51))
            assert all(p.done for p in pending)


async def test_request_timeout_when_the_server_does_not_answer() -> None:
    with trio.fail_after(10):
        async with running_server() as server, running_proxy(server.port) as proxy, \
                connect(proxy.url, request_timeout=0.3) as c:
            await c.wait_connected()
            proxy.freeze()
            with pytest.raises(RequestTimeout, match="may or may not have been published"):
                await c.publish("t", 1)
            with pytest.raises(RequestTimeout):
                await c.subscribe("t")
            assert c.statistics().pending_requests == 0


async def test_dead_connection_is_detected_by_ping_and_replaced() -> None:
    rec = Recorder()
    with trio.fail_after(15):
        async with running_server(heartbeat=0.2) as server, running_proxy(server.port) as proxy, \
                connect(proxy.url, ping_timeout=0.3, on_event=rec, **FAST) as c:
            sub = await c.subscribe("k")
            await c.wait_connected()
            ack = await c.publish("k", 1)
            assert (await sub.__anext__()).data == 1
            proxy.freeze()  # the network goes silent; nothing is closed
            gone = await rec.wait_for(Disconnected)
            assert gone.code == 1006 and "ping_timeout" in gone.reason
            proxy.thaw()
            await rec.wait_for(Connected, 2)
            ack = await c.publish("k", 2)
            assert await sub.__anext__() == Message("k", 2, 2, ack.epoch)


async def test_invalid_options() -> None:
    for kwargs, fragment in [
        ({"encoding": "xml"}, "encoding"),
        ({"min_backoff": 2, "max_backoff": 1}, "min_backoff"),
        ({"backoff_factor": 0.5}, "backoff_factor"),
        ({"max_offline_queue": -1}, "max_offline_queue"),
        ({"on_recovery_lost": "ignore"}, "on_recovery_lost"),
        ({"request_timeout": 0}, "request_timeout"),
        ({"buffer_size": 0}, "buffer_size"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            async with connect("ws://127.0.0.1:1/ws", **kwargs):
                pass  # pragma: no cover
    with pytest.raises(ValueError, match="url"):
        async with connect("http://127.0.0.1/ws"):
            pass  # pragma: no cover


def test_public_names() -> None:
    for name in rc.__all__:
        assert hasattr(rc, name), name
    assert rc.Reconnecting is Reconnecting


async def test_wait_subscribed() -> None:
    with trio.fail_after(10):
        async with running_server() as server, connect(server.url) as c:
            sub = await c.subscribe("w")  # made while connecting
            await sub.wait_subscribed()
            server.hub.publish("w", "out of band", trio.current_time())  # as a backend would
            assert (await sub.__anext__()).data == "out of band"
            await sub.wait_subscribed()  # at once, now
            await sub.unsubscribe()
            await sub.wait_subscribed()  # it was confirmed before


async def test_poke_channel_yields_pokes() -> None:
    with trio.fail_after(10):
        async with running_server(channels=[{"pattern": "orders.*", "mode": "poke"}]) as server, \
                connect(server.url) as c:
            await c.wait_connected()
            sub = await c.subscribe("orders.u1")
            ack = await c.publish("orders.u1", {"id": 7})
            poke = await sub.__anext__()
            assert poke == Poke("orders.u1", 1, ack.epoch) and poke.data is None


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_messages_carry_the_publish_time_and_their_latency(encoding: str) -> None:
    """``ts`` is the server's ingress stamp: between the publish call and the receipt, the
    same on a live message and on the same message recovered later; latency = received - ts."""
    with trio.fail_after(10):
        async with running_server() as server, connect(server.url, encoding=encoding) as c:
            await c.wait_connected()
            sub = await c.subscribe("t")
            await sub.wait_subscribed()
            before = time.time()
            ack = await c.publish("t", {"n": 1})
            live = await sub.__anext__()
            after = time.time()
            assert live.ts is not None and live.received is not None and live.latency is not None
            assert before - 0.001 <= live.ts <= live.received <= after + 0.001
            assert live.latency == live.received - live.ts
            stats = sub.statistics()
            assert stats.latency_p50 is not None and stats.latency_p99 is not None
            assert 0 <= stats.latency_p50 <= stats.latency_p99 <= stats.latency_max <= after - before + 0.002
            async with connect(server.url, encoding=encoding) as d:
                again = await d.subscribe("t", since=(ack.epoch, 0))
                recovered = await again.__anext__()
            assert recovered == live and recovered.ts == live.ts
