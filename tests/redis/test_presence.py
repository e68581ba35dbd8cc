"""Presence across ``relay serve`` nodes on one real Redis: every node sees every member,
join/leave reach subscribers on every node, and the members of a SIGKILLed node expire
within ``presence_ttl``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from .conftest import client, redis_cluster, redis_server, relay_nodes, wait_ready

CONFIG = """
presence_ttl = 1.0
[limits]
messages_per_second = 0
bytes_per_second = 0
[[channels]]
pattern = "lobby.*"
presence = true
join_leave = true
[[channels]]
pattern = "big.*"
presence = true
join_leave = true
join_leave_interval = 0.1
"""


async def conns(c: Any, channel: str) -> list[str]:
    answer = await c.request({"type": "presence", "channel": channel, "ref": "p"})
    assert answer["type"] == "presence" and answer["ref"] == "p", answer
    return [m["conn"] for m in answer["members"]]


async def test_members_join_and_leave_across_nodes_and_a_dead_nodes_members_expire(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with redis_server(tmp_path) as redis, \
                relay_nodes(tmp_path, 3, "--redis-url", redis.url, config=CONFIG) as (a, b, c):
            async with client(b) as sb, client(c, "msgpack") as asker:
                await sb.subscribe("lobby.1")
                own = await sb.recv()
                assert own["type"] == "join" and own["member"]["conn"] == sb.welcome["session"]
                async with client(a) as sa:
                    await sa.subscribe("lobby.1")
                    joined = await sb.recv()
                    assert joined == {"type": "join", "channel": "lobby.1", "member": {
                        "user": "", "conn": sa.welcome["session"], "joined": joined["member"]["joined"]}}
                    assert (await sa.recv())["type"] == "join"  # its own
                    # Node c has no subscriber of the channel: it answers from Redis.
                    assert await conns(asker, "lobby.1") == [sb.welcome["session"], sa.welcome["session"]]
                    stats = await asker.request({"type": "presence_stats", "channel": "lobby.1", "ref": 2})
                    assert stats == {"type": "presence_stats", "channel": "lobby.1", "ref": 2,
                                     "connections": 2, "users": 1}
                    await sa.request({"type": "unsubscribe", "channel": "lobby.1", "ref": 1})
                    left = await sb.recv()
                    assert left["type"] == "leave" and left["member"]["conn"] == sa.welcome["session"]
                    assert await conns(asker, "lobby.1") == [sb.welcome["session"]]

                    # Batched: one presence_diff per node per interval.
                    await sb.subscribe("big.1")
                    assert (await sb.recv())["type"] == "presence_diff"
                    async with client(a) as x, client(a) as y:
                        await x.subscribe("big.1")
                        await y.subscribe("big.1")
                        seen: list[str] = []
                        while len(seen) < 2:
                            diff = await sb.recv()
                            assert diff["type"] == "presence_diff" and diff["leaves"] == [], diff
                            seen += [m["conn"] for m in diff["joins"]]
                        assert sorted(seen) == sorted([x.welcome["session"], y.welcome["session"]])

                    # Node a dies with a member in lobby.1: gone within presence_ttl.
                    await sa.subscribe("lobby.1")
                    assert (await sb.recv())["member"]["conn"] == sa.welcome["session"]
                    a.proc.kill()
                    killed = trio.current_time()
                    left = await sb.recv(timeout=5)
                    while left["type"] != "leave" or left["channel"] != "lobby.1":
                        left = await sb.recv(timeout=5)
                    assert left["member"]["conn"] == sa.welcome["session"]
                    assert trio.current_time() - killed < 1.0 + 1.0  # presence_ttl + one refresh
                    assert await conns(asker, "lobby.1") == [sb.welcome["session"]]


async def test_presence_on_a_redis_cluster_keeps_each_channels_keys_in_its_slot(tmp_path: Path) -> None:
    channels = [f"lobby.{i}" for i in range(6)]
    with trio.fail_after(30):
        async with redis_cluster(tmp_path) as masters, \
                relay_nodes(tmp_path, 2, "--redis-cluster", "--redis-url", masters[0].url, config=CONFIG) as (a, b):
            async with client(a) as sa, client(b) as sb:
                for c in channels:
                    await sa.subscribe(c)
                    assert (await sa.recv())["type"] == "join"
                for c in channels:
                    await sb.subscribe(c)
                    assert (await sb.recv())["type"] == "join"
                    joined = await sa.recv()  # through SPUBLISH on the channel's master
                    assert joined["channel"] == c and joined["member"]["conn"] == sb.welcome["session"]
                    assert await conns(sb, c) == [sa.welcome["session"], sb.welcome["session"]]
                    slot = await masters[0].command("CLUSTER", "KEYSLOT", f"relay:{{{c}}}")
                    assert await masters[0].command("CLUSTER", "KEYSLOT", f"relay:{{{c}}}:p") == slot


async def test_members_come_back_after_redis_restarted_empty(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with redis_server(tmp_path) as redis, \
                relay_nodes(tmp_path, 2, "--redis-url", redis.url, config=CONFIG) as (a, b):
            async with client(a) as sa, client(b) as asker:
                await sa.subscribe("lobby.r")
                assert await conns(asker, "lobby.r") == [sa.welcome["session"]]
                await redis.kill()
                await wait_ready(a, ready=False)
                answer = await asker.request({"type": "presence_stats", "channel": "lobby.r", "ref": 1})
                assert answer["type"] == "error" and answer["code"] == "unavailable" and answer["ref"] == 1
                await redis.start()  # same port, empty
                await wait_ready(a)
                await wait_ready(b)
                # Node a rewrites its members at its next refresh (a third of presence_ttl).
                while await conns(asker, "lobby.r") != [sa.welcome["session"]]:
                    await trio.sleep(0.05)
