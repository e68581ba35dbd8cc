"""Several ``relay serve`` nodes on one real Redis: delivery, order, recovery, history,
and one Redis subscription per channel per node."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from server.conftest import check_ts
from .conftest import client, http, numsub, redis_server, relay_nodes


@pytest.mark.parametrize("publisher_encoding", ["json", "msgpack"])
async def test_a_message_published_on_any_node_reaches_every_subscriber_in_both_encodings(
        tmp_path: Path, publisher_encoding: str) -> None:
    with trio.fail_after(30):
        async with redis_server(tmp_path) as redis, \
                relay_nodes(tmp_path, 3, "--redis-url", redis.url) as (a, b, c):
            async with client(a, "json") as sa, client(b, "msgpack") as sb, \
                    client(c, publisher_encoding) as pub:
                subscribed = [await sa.subscribe("chat", ref=1), await sb.subscribe("chat", ref=1)]
                assert {s["epoch"] for s in subscribed} != {""}
                assert subscribed[0]["epoch"] == subscribed[1]["epoch"]
                ack = await pub.request({"type": "publish", "channel": "chat", "data": {"n": 1}, "ref": 7})
                assert ack == {"type": "ack", "ref": 7, "channel": "chat", "offset": 1,
                               "epoch": subscribed[0]["epoch"]}
                status, body = await http(a, "POST", "/api/publish", {"channel": "chat", "data": [2, "two"]})
                assert status == 200 and body["offset"] == 2, body
                for sub in (sa, sb):
                    assert await sub.recv() == {"type": "message", "channel": "chat", "offset": 1, "data": {"n": 1}}
                    assert await sub.recv() == {"type": "message", "channel": "chat", "offset": 2, "data": [2, "two"]}
                    await sub.expect_silence(0.1)
                # One history, whichever node is asked.
                histories = [await http(node, "GET", "/api/channels/chat/history") for node in (a, b, c)]
                assert all(h == histories[0] for h in histories), histories
                pubs = histories[0][1]["publications"]
                stamps = [check_ts(p) for p in pubs]
                assert pubs == [{"offset": 1, "data": {"n": 1}}, {"offset": 2, "data": [2, "two"]}]
                assert stamps[0] <= stamps[1], stamps


async def test_concurrent_publishers_on_different_nodes_give_every_subscriber_the_same_order(
        tmp_path: Path) -> None:
    per_publisher = 150
    with trio.fail_after(40):
        async with redis_server(tmp_path) as redis, \
                relay_nodes(tmp_path, 2, "--redis-url", redis.url,
                            config="[limits]\nmessages_per_second = 0\nbytes_per_second = 0\n") as (a, b):
            async with client(a) as s1, client(a, "msgpack") as s2, client(b) as s3, client(b, "msgpack") as s4, \
                    client(a) as p1, client(b) as p2, client(b) as p3:
                subs = [s1, s2, s3, s4]
                for s in subs:
                    await s.subscribe("race", ref=1)
                seen: list[list[Any]] = [[] for _ in subs]
                total = 3 * per_publisher

                async def publish(pub: Any, tag: str) -> None:
                    for i in range(per_publisher):
                        await pub.send({"type": "publish", "channel": "race", "data": f"{tag}{i}"})
                        if i % 25 == 0:
                            await trio.sleep(0)

                async def collect(i: int) -> None:
                    while len(seen[i]) < total:
                        msg = await subs[i].recv()
                        assert msg["type"] == "message", msg
                        seen[i].append((msg["offset"], msg["data"]))

                async with trio.open_nursery() as nursery:
                    for i in range(len(subs)):
                        nursery.start_soon(collect, i)
                    for pub, tag in ((p1, "a"), (p2, "b"), (p3, "c")):
                        nursery.start_soon(publish, pub, tag)
                assert [o for o, _ in seen[0]] == list(range(1, total + 1))
                assert all(s == seen[0] for s in seen), "subscribers saw different orders"
                for tag in "abc":  # each publisher's messages keep their own order too
                    mine = [d for _, d in seen[0] if d.startswith(tag)]
                    assert mine == [f"{tag}{i}" for i in range(per_publisher)]


async def test_a_client_recovers_on_another_node_what_it_missed(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with redis_server(tmp_path) as redis, \
                relay_nodes(tmp_path, 2, "--redis-url", redis.url) as (a, b):
            async with client(b) as pub:
                async with client(a) as sub:
                    first = await sub.subscribe("feed", ref=1)
                    for i in range(3):
                        await http(b, "POST", "/api/publish", {"channel": "feed", "data": i})
                    got = [await sub.recv() for _ in range(3)]
                    assert [m["offset"] for m in got] == [1, 2, 3]
                # node a's client is gone; three more while it is away
                for i in range(3, 6):
                    await http(b, "POST", "/api/publish", {"channel": "feed", "data": i})
                async with client(b) as back:
                    answer = await back.subscribe("feed", ref=2, since={"epoch": first["epoch"], "offset": 3})
                    assert answer["recovered"] is True and answer["offset"] == 6, answer
                    assert [(await back.recv())["data"] for _ in range(3)] == [3, 4, 5]
                    await pub.publish("feed", "live", ref=9)
                    assert await back.recv() == {"type": "message", "channel": "feed", "offset": 7, "data": "live"}
                    await back.expect_silence(0.1)
                async with client(a) as other:
                    wrong = await other.subscribe("feed", since={"epoch": "nope", "offset": 3})
                    assert wrong["recovered"] is False and wrong["offset"] == 7
                    future = await other.subscribe("feed2", since={"epoch": first["epoch"], "offset": 99})
                    assert future["recovered"] is False
                    await other.expect_silence(0.1)


async def test_live_messages_arriving_during_recovery_are_neither_lost_nor_repeated(tmp_path: Path) -> None:
    """Subscribers with ``since`` join while another node publishes without pause."""
    with trio.fail_after(40):
        async with redis_server(tmp_path) as redis, \
                relay_nodes(tmp_path, 2, "--redis-url", redis.url,
                            config="[limits]\nmessages_per_second = 0\nbytes_per_second = 0\n"
                                   "[[channels]]\npattern = '*'\nhistory_size = 5000\n") as (a, b):
            async with client(b) as pub, client(a) as watcher:
                start = await watcher.subscribe("busy", ref=0)
                stop = trio.Event()

                async def publish() -> None:
                    i = 0
                    while not stop.is_set():
                        await pub.send({"type": "publish", "channel": "busy", "data": i})
                        i += 1
                        await trio.sleep(0.002)

                watched: list[int] = []

                async def watch() -> None:
                    while True:
                        watched.append((await watcher.recv())["offset"])

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(publish)
                    nursery.start_soon(watch)
                    for round_ in range(6):
                        await trio.sleep(0.05)
                        # recover the last ~30 while the publisher goes on (bounded work per round)
                        since = max(1, (watched[-1] if watched else 1) - 30)
                        async with client(a, "msgpack" if round_ % 2 else "json") as joiner:
                            answer = await joiner.subscribe(
                                "busy", since={"epoch": start["epoch"], "offset": since})
                            assert answer["recovered"] is True, answer
                            offsets = []
                            while len(offsets) < answer["offset"] - since + 20:
                                msg = await joiner.recv()
                                assert msg["type"] == "message", msg
                                offsets.append(msg["offset"])
                            assert offsets == list(range(since + 1, since + 1 + len(offsets))), offsets
                    stop.set()
                    await trio.sleep(0.2)
                    nursery.cancel_scope.cancel()
                assert watched == list(range(1, len(watched) + 1)) and len(watched) > 100


async def test_history_is_trimmed_to_history_size_and_expires_after_history_ttl(tmp_path: Path) -> None:
    config = """
[[channels]]
pattern = "short.*"
history_size = 3

[[channels]]
pattern = "brief.*"
history_size = 10
history_ttl = 0.6
"""
    with trio.fail_after(30):
        async with redis_server(tmp_path) as redis, \
                relay_nodes(tmp_path, 2, "--redis-url", redis.url, config=config) as (a, b):
            for i in range(8):
                await http(a, "POST", "/api/publish", {"channel": "short.x", "data": i})
            assert await redis.command("XLEN", "relay:{short.x}:s") == 3
            status, body = await http(b, "GET", "/api/channels/short.x/history")
            assert status == 200 and body["offset"] == 8
            assert [p["data"] for p in body["publications"]] == [5, 6, 7]
            async with client(b) as late:
                gone = await late.subscribe("short.x", since={"epoch": body["epoch"], "offset": 2})
                assert gone["recovered"] is False, gone
                assert [(await late.recv())["offset"] for _ in range(3)] == [6, 7, 8]  # what is left
                kept = await late.subscribe("short.y", since={"epoch": "x", "offset": 0})
                assert kept["recovered"] is False

            status, body = await http(a, "POST", "/api/publish", {"channel": "brief.x", "data": "soon gone"})
            assert status == 200
            ttl = await redis.command("PTTL", "relay:{brief.x}:s")
            assert 0 < ttl <= 600, ttl
            status, fresh = await http(b, "GET", "/api/channels/brief.x/history")
            assert [p["data"] for p in fresh["publications"]] == ["soon gone"]
            await trio.sleep(0.8)
            status, old = await http(b, "GET", "/api/channels/brief.x/history")
            assert status == 200 and old["publications"] == [] and old["offset"] == 1, old
            assert await redis.command("EXISTS", "relay:{brief.x}:s") == 0
            async with client(a) as late:
                expired = await late.subscribe("brief.x", since={"epoch": body["epoch"], "offset": 0})
                assert expired["recovered"] is False, expired
                await late.expect_silence(0.1)


async def test_a_node_subscribes_to_a_channel_in_redis_once_however_many_local_subscribers(
        tmp_path: Path) -> None:
    async def counts(*channels: str) -> dict[str, int]:
        return numsub(await redis.command("PUBSUB", "NUMSUB", *(f"relay:{{{c}}}" for c in channels)))

    async def wait_counts(expected: dict[str, int]) -> None:
        with trio.fail_after(5):
            while (found := await counts(*expected)) != {f"relay:{{{c}}}": n for c, n in expected.items()}:
                await trio.sleep(0.02)
            assert found

    with trio.fail_after(30):
        async with redis_server(tmp_path) as redis, \
                relay_nodes(tmp_path, 2, "--redis-url", redis.url) as (a, b):
            async with client(a) as a1, client(a) as a2, client(a, "msgpack") as a3, client(b) as b1:
                for c in (a1, a2, a3):
                    await c.subscribe("x")
                await a1.subscribe("y")
                await b1.subscribe("x")
                await wait_counts({"x": 2, "y": 1})  # one per node, not one per subscriber
                await a1.request({"type": "unsubscribe", "channel": "y"})
                await wait_counts({"x": 2, "y": 0})
                await a1.request({"type": "unsubscribe", "channel": "x"})
                await a2.request({"type": "unsubscribe", "channel": "x"})
                await wait_counts({"x": 2})  # a3 still listens on node a
                status, _ = await http(b, "POST", "/api/publish", {"channel": "x", "data": 1})
                assert status == 200
                assert (await a3.recv())["data"] == 1
                assert (await b1.recv())["data"] == 1
            await wait_counts({"x": 0, "y": 0})  # every client gone: no node listens
            clients = await redis.command("CLIENT", "LIST")
            names = [f for line in clients.splitlines() for f in line.split() if f.startswith("name=relay-")]
            assert sorted(names) == sorted(f"name=relay-node{i}-{k}" for i in (0, 1) for k in ("cmd", "sub"))


async def test_an_event_stream_on_one_node_gets_what_another_node_publishes(tmp_path: Path) -> None:
    """The SSE fallback subscribes through the same hub, so it works across nodes too."""
    with trio.fail_after(30):
        async with redis_server(tmp_path) as redis, \
                relay_nodes(tmp_path, 2, "--redis-url", redis.url) as (a, b):
            stream = await trio.open_tcp_stream("127.0.0.1", a.port)
            async with stream:
                await stream.send_all(b"GET /sse?channel=news HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      b"Accept: text/event-stream\r\n\r\n")
                seen = b""
                while b"event: subscribed" not in seen:
                    seen += await stream.receive_some(65536)
                status, body = await http(b, "POST", "/api/publish", {"channel": "news", "data": {"h": "hi"}})
                assert status == 200, body
                while b'"data":{"h":"hi"}' not in seen:
                    chunk = await stream.receive_some(65536)
                    assert chunk, seen
                    seen += chunk
                assert seen.startswith(b"HTTP/1.1 200"), seen[:200]
                assert b'"offset":1' in seen


async def test_state_and_poke_channels_work_across_nodes(tmp_path: Path) -> None:
    config = """
[[channels]]
pattern = "prices.*"
mode = "state"
history_size = 0

[[channels]]
pattern = "docs.*"
mode = "poke"
history_size = 10
"""
    with trio.fail_after(30):
        async with redis_server(tmp_path) as redis, \
                relay_nodes(tmp_path, 2, "--redis-url", redis.url, config=config) as (a, b):
            for price in (1.10, 1.11, 1.12):
                status, _ = await http(b, "POST", "/api/publish", {"channel": "prices.EURUSD", "data": price})
                assert status == 200
            async with client(a) as sub, client(a, "msgpack") as other:
                # a new subscriber on another node gets the current value at once, from Redis
                snap = await sub.subscribe("prices.EURUSD", ref=1)
                assert snap["offset"] == 3 and snap["recovered"] is False
                assert await sub.recv() == {"type": "message", "channel": "prices.EURUSD", "offset": 3, "data": 1.12}
                # one that already has it gets nothing again
                same = await other.subscribe("prices.EURUSD", since={"epoch": snap["epoch"], "offset": 3})
                assert same["recovered"] is True
                await other.expect_silence(0.1)
                await http(b, "POST", "/api/publish", {"channel": "prices.EURUSD", "data": 1.13})
                for s in (sub, other):
                    assert (await s.recv())["data"] == 1.13
                status, hist = await http(a, "GET", "/api/channels/prices.EURUSD/history")
                assert hist["publications"] == [] and hist["offset"] == 4  # history_size = 0

                await sub.subscribe("docs.readme")
                await http(b, "POST", "/api/publish", {"channel": "docs.readme", "data": {"big": "x" * 100}})
                assert await sub.recv() == {"type": "poke", "channel": "docs.readme", "offset": 1}
                status, hist = await http(a, "GET", "/api/channels/docs.readme/history?since=0")
                assert [p["data"] for p in hist["publications"]] == [{"big": "x" * 100}]


async def test_a_ticked_channel_across_nodes_delivers_each_message_once_in_tick_frames(tmp_path: Path) -> None:
    """``tick_ms`` on a channel with Redis: each node batches what Redis delivered to it per
    tick; a subscriber that joins on another node mid-stream (recovering from Redis) gets
    every message once."""
    config = """
[[channels]]
pattern = "feed.*"
tick_ms = 40
"""
    with trio.fail_after(30):
        async with redis_server(tmp_path) as redis, \
                relay_nodes(tmp_path, 2, "--redis-url", redis.url, config=config) as (a, b):
            async with client(a) as early, client(a) as late, client(b) as pub:
                subscribed = await early.subscribe("feed.x", ref=1)
                for i in range(1, 21):
                    await pub.send({"type": "publish", "channel": "feed.x", "data": i})
                    if i == 10:
                        await late.send({"type": "subscribe", "channel": "feed.x",
                                         "since": {"epoch": subscribed["epoch"], "offset": 0}})
                for sub, skip_subscribed in ((early, False), (late, True)):
                    got: list[Any] = []
                    while not got or got[-1]["offset"] < 20:
                        with trio.fail_after(5):
                            decoded = json.loads(await sub.ws.recv())
                        for msg in decoded if isinstance(decoded, list) else [decoded]:
                            if msg["type"] == "message":
                                check_ts(msg)
                                got.append(msg)
                            else:
                                assert skip_subscribed and msg["type"] == "subscribed", msg
                    assert [m["data"] for m in got] == list(range(1, 21)), got
                    assert [m["offset"] for m in got] == list(range(1, 21))
