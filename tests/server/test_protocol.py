"""Protocol v1 end to end over loopback: welcome, subscribe, publish, acks, encodings."""

from __future__ import annotations

import json

import msgpack
import pytest
import trio
import trio_websocket

from .conftest import open_client, running_server


async def test_welcome_is_first_and_names_session_node_heartbeat() -> None:
    with trio.fail_after(10):
        async with running_server(heartbeat=7.0) as server, open_client(server) as c:
            w = c.welcome
            assert w["node"] == "test"
            assert w["heartbeat"] == 7.0
            assert isinstance(w["session"], str) and w["session"]
            async with open_client(server) as c2:
                assert c2.welcome["session"] != w["session"]


@pytest.mark.parametrize("ref", [1, "abc", 0, -5, "x" * 256], ids=["int", "str", "zero", "neg", "long-str"])
async def test_ping_echoes_ref(ref: object) -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as c:
            assert await c.request({"type": "ping", "ref": ref}) == {"type": "pong", "ref": ref}


async def test_answers_without_ref_have_no_ref() -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as c:
            assert await c.request({"type": "ping"}) == {"type": "pong"}
            sub = await c.request({"type": "subscribe", "channel": "a"})
            assert "ref" not in sub
            # a publish without ref gets no ack; the subscriber still sees the message
            await c.send({"type": "publish", "channel": "a", "data": 1})
            msg = await c.recv()
            assert msg == {"type": "message", "channel": "a", "offset": 1, "data": 1}


@pytest.mark.parametrize("enc", ["json", "json-explicit", "msgpack"])
async def test_subscribe_publish_ack_offsets(enc: str) -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server, enc) as sub, open_client(server, enc) as pub:
            s = await sub.subscribe("room.1", ref=10)
            assert s["ref"] == 10 and s["channel"] == "room.1"
            assert s["offset"] == 0 and s["recovered"] is False
            epoch = s["epoch"]
            for i in range(1, 6):
                ack = await pub.publish("room.1", {"n": i}, ref=i)
                assert ack == {"type": "ack", "ref": i, "channel": "room.1", "offset": i, "epoch": epoch}
            for i in range(1, 6):
                assert await sub.recv() == {"type": "message", "channel": "room.1", "offset": i, "data": {"n": i}}


async def test_json_publisher_reaches_msgpack_subscriber_and_back() -> None:
    data = {"price": 101.25, "sym": "ÄBC", "levels": [1, 2, None, True], "nested": {"k": "v"}}
    with trio.fail_after(10):
        async with running_server() as server, open_client(server, "json") as j, open_client(server, "msgpack") as m:
            await j.subscribe("x")
            await m.subscribe("x")
            await j.send({"type": "publish", "channel": "x", "data": data, "ref": 1})
            assert (await m.recv())["data"] == data
            assert (await j.recv())["data"] == data
            assert (await j.recv())["type"] == "ack"
            await m.send({"type": "publish", "channel": "x", "data": [1, "two"], "ref": 2})
            assert (await j.recv())["data"] == [1, "two"]
            assert (await m.recv())["data"] == [1, "two"]
            assert (await m.recv())["type"] == "ack"


async def test_many_subscribers_many_channels_each_get_their_own() -> None:
    n_clients, n_channels, n_msgs = 20, 5, 10
    with trio.fail_after(30):
        async with running_server() as server:
            from contextlib import AsyncExitStack

            async with AsyncExitStack() as stack:
                clients = [await stack.enter_async_context(open_client(server, "msgpack" if i % 2 else "json"))
                           for i in range(n_clients)]
                for i, c in enumerate(clients):
                    await c.subscribe(f"ch{i % n_channels}")
                pub = await stack.enter_async_context(open_client(server))
                for k in range(n_msgs):
                    for ch in range(n_channels):
                        await pub.publish(f"ch{ch}", {"k": k, "ch": ch})
                for i, c in enumerate(clients):
                    got = [await c.recv() for _ in range(n_msgs)]
                    assert [m["offset"] for m in got] == list(range(1, n_msgs + 1))
                    assert all(m["channel"] == f"ch{i % n_channels}" and m["data"]["ch"] == i % n_channels
                               for m in got)
                    await c.expect_silence(0.05)
                stats = server.hub.statistics()
                assert stats.channels == n_channels and stats.subscriptions == n_clients


async def test_unsubscribe_stops_delivery_and_is_idempotent() -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as c, open_client(server) as p:
            await c.subscribe("a")
            await p.publish("a", 1)
            assert (await c.recv())["offset"] == 1
            assert await c.request({"type": "unsubscribe", "channel": "a", "ref": 3}) == {
                "type": "unsubscribed", "channel": "a", "ref": 3}
            await p.publish("a", 2)
            await c.expect_silence()
            assert (await c.request({"type": "unsubscribe", "channel": "a"}))["type"] == "unsubscribed"
            # subscribe again: continues at the channel's offset
            s = await c.subscribe("a")
            assert s["offset"] == 2


async def test_double_subscribe_is_an_error_and_changes_nothing() -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as c, open_client(server) as p:
            await c.subscribe("a")
            err = await c.request({"type": "subscribe", "channel": "a", "ref": 9})
            assert err["type"] == "error" and err["code"] == "bad_request" and err["ref"] == 9
            await p.publish("a", "once")
            assert (await c.recv())["data"] == "once"
            await c.expect_silence()


async def test_publisher_subscribed_to_own_channel_gets_message_then_ack() -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as c:
            await c.subscribe("self")
            await c.send({"type": "publish", "channel": "self", "data": "hi", "ref": 1})
            first, second = await c.recv(), await c.recv()
            assert first["type"] == "message" and second["type"] == "ack"


async def test_trio_websocket_client_works_too() -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            async with trio_websocket.open_websocket_url(server.url, subprotocols=["relay.v1.msgpack"]) as ws:
                assert ws.subprotocol == "relay.v1.msgpack"
                welcome = msgpack.unpackb(await ws.get_message())
                assert welcome["type"] == "welcome"
                await ws.send_message(msgpack.packb({"type": "subscribe", "channel": "t", "ref": 1}))
                assert msgpack.unpackb(await ws.get_message())["type"] == "subscribed"
                await ws.send_message(msgpack.packb({"type": "publish", "channel": "t", "data": b"x".decode(), "ref": 2}))
                kinds = {msgpack.unpackb(await ws.get_message())["type"] for _ in range(2)}
                assert kinds == {"message", "ack"}
            async with trio_websocket.open_websocket_url(server.url) as ws:
                assert ws.subprotocol is None
                assert json.loads(await ws.get_message())["type"] == "welcome"


async def test_disconnect_removes_subscriptions() -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            async with open_client(server) as c:
                await c.subscribe("a")
                await c.subscribe("b")
                assert server.hub.statistics().subscriptions == 2
            with trio.fail_after(5):
                while server.connections:
                    await trio.sleep(0.01)
            assert server.hub.statistics().subscriptions == 0
