"""Offsets, epochs, history and recovery with ``since``; the three channel modes."""

from __future__ import annotations

import trio

from .conftest import http_get, open_client, running_server


async def test_recovery_delivers_missed_in_order_then_live() -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as pub:
            async with open_client(server) as c:
                s = await c.subscribe("feed")
                await pub.publish("feed", 1)
                got = await c.recv()
                last = (s["epoch"], got["offset"])
            # offline: 2..6 are published
            for i in range(2, 7):
                await pub.publish("feed", i)
            async with open_client(server, "msgpack") as c:
                s = await c.subscribe("feed", since={"epoch": last[0], "offset": last[1]}, ref=1)
                assert s["recovered"] is True and s["offset"] == 6 and s["epoch"] == last[0]
                await pub.publish("feed", 7)
                got = [await c.recv() for _ in range(6)]
                assert [m["offset"] for m in got] == [2, 3, 4, 5, 6, 7]
                assert [m["data"] for m in got] == [2, 3, 4, 5, 6, 7]
                await c.expect_silence(0.1)


async def test_since_current_offset_recovers_nothing_missing() -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as c:
            await c.publish("a", "x")
            s = await c.subscribe("a", since={"epoch": (await c.publish("a", "y"))["epoch"], "offset": 2})
            assert s["recovered"] is True
            await c.expect_silence(0.1)


async def test_epoch_change_gives_recovered_false() -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as c:
            ack = await c.publish("a", 1)
        # a restarted node lost its in-memory history: new epoch
        async with running_server() as server, open_client(server) as c:
            await c.publish("a", "new")
            s = await c.subscribe("a", since={"epoch": ack["epoch"], "offset": ack["offset"]})
            assert s["recovered"] is False and s["epoch"] != ack["epoch"]
            await c.expect_silence(0.1)


async def test_range_gone_from_history_gives_recovered_false_with_what_is_left() -> None:
    with trio.fail_after(10):
        async with running_server(channels=[{"pattern": "*", "history_size": 3}]) as server, \
                open_client(server) as c:
            acks = [await c.publish("a", i) for i in range(1, 9)]  # offsets 1..8, ring keeps 6..8
            epoch = acks[0]["epoch"]
            s = await c.subscribe("a", since={"epoch": epoch, "offset": 2})
            assert s["recovered"] is False
            assert [(await c.recv())["offset"] for _ in range(3)] == [6, 7, 8]
            await c.request({"type": "unsubscribe", "channel": "a"})
            s = await c.subscribe("a", since={"epoch": epoch, "offset": 5})
            assert s["recovered"] is True
            assert [(await c.recv())["offset"] for _ in range(3)] == [6, 7, 8]


async def test_history_ttl_expiry_gives_recovered_false() -> None:
    with trio.fail_after(10):
        async with running_server(channels=[{"pattern": "*", "history_ttl": 0.2}]) as server, \
                open_client(server) as c:
            first = await c.publish("a", 1)
            await c.publish("a", 2)
            await trio.sleep(0.3)
            s = await c.subscribe("a", since={"epoch": first["epoch"], "offset": 1})
            assert s["recovered"] is False
            await c.expect_silence(0.1)


async def test_future_offset_is_not_recovered() -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as c:
            ack = await c.publish("a", 1)
            s = await c.subscribe("a", since={"epoch": ack["epoch"], "offset": 99})
            assert s["recovered"] is False


async def test_state_mode_sends_current_value_on_subscribe() -> None:
    chans = [{"pattern": "prices.*", "mode": "state"}]
    with trio.fail_after(10):
        async with running_server(channels=chans) as server, open_client(server) as pub:
            for p in (100, 101, 102):
                await pub.publish("prices.EURUSD", {"bid": p})
            async with open_client(server, "msgpack") as c:
                s = await c.subscribe("prices.EURUSD")
                assert s["offset"] == 3
                snap = await c.recv()
                assert snap == {"type": "message", "channel": "prices.EURUSD", "offset": 3, "data": {"bid": 102}}
                await pub.publish("prices.EURUSD", {"bid": 103})
                assert (await c.recv())["data"] == {"bid": 103}
                # resubscribe with since = current: nothing newer, nothing resent
                await c.request({"type": "unsubscribe", "channel": "prices.EURUSD"})
                s = await c.subscribe("prices.EURUSD", since={"epoch": s["epoch"], "offset": 4})
                assert s["recovered"] is True
                await c.expect_silence(0.1)
            async with open_client(server) as c:
                # no value yet on an empty state channel: just subscribed
                await c.subscribe("prices.NEW")
                await c.expect_silence(0.1)


async def test_state_mode_with_stale_since_gets_latest_value_only() -> None:
    with trio.fail_after(10):
        async with running_server(channels=[{"pattern": "*", "mode": "state"}]) as server, \
                open_client(server) as c:
            acks = [await c.publish("s", i) for i in range(5)]
            s = await c.subscribe("s", since={"epoch": acks[0]["epoch"], "offset": 1})
            assert s["recovered"] is True
            assert await c.recv() == {"type": "message", "channel": "s", "offset": 5, "data": 4}
            await c.expect_silence(0.1)


async def test_poke_mode_sends_offsets_and_history_serves_data() -> None:
    with trio.fail_after(10):
        async with running_server(channels=[{"pattern": "orders.*", "mode": "poke"}]) as server, \
                open_client(server) as pub, open_client(server) as c:
            s = await c.subscribe("orders.1")
            await pub.publish("orders.1", {"id": 1})
            await pub.publish("orders.1", {"id": 2})
            assert await c.recv() == {"type": "poke", "channel": "orders.1", "offset": 1}
            assert await c.recv() == {"type": "poke", "channel": "orders.1", "offset": 2}
            status, body = await http_get(server, "/api/channels/orders.1/history?since=0")
            assert status == 200
            assert [p["data"] for p in body["publications"]] == [{"id": 1}, {"id": 2}]
            # recovery on a poke channel: one poke with the newest offset
            await c.request({"type": "unsubscribe", "channel": "orders.1"})
            await pub.publish("orders.1", {"id": 3})
            s = await c.subscribe("orders.1", since={"epoch": s["epoch"], "offset": 1})
            assert s["recovered"] is True
            assert await c.recv() == {"type": "poke", "channel": "orders.1", "offset": 3}
            await c.expect_silence(0.1)
