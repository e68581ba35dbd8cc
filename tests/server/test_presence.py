"""Presence on one node over loopback: ``presence`` and ``presence_stats`` answers, their
errors, join/leave (one by one, batched, capped) and members under churn."""

from __future__ import annotations

import random
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio

from relay.config import AuthConfig, ChannelOptions

from .conftest import Client, open_client, running_server
from .test_auth import SECRET, bearer, token

PRESENCE = ChannelOptions(pattern="lobby.*", presence=True, join_leave=True)
QUIET = ChannelOptions(pattern="quiet.*", presence=True)
BATCHED = ChannelOptions(pattern="big.*", presence=True, join_leave=True, join_leave_interval=0.1)
CAPPED = ChannelOptions(pattern="capped.*", presence=True, join_leave=True, join_leave_max_members=2)
CHANNELS = (PRESENCE, QUIET, BATCHED, CAPPED)


async def members(c: Client, channel: str, ref: Any = "m") -> list[dict[str, Any]]:
    answer = await c.request({"type": "presence", "channel": channel, "ref": ref})
    assert answer["type"] == "presence" and answer["ref"] == ref and answer["channel"] == channel, answer
    return answer["members"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_presence_and_stats_answer_with_the_subscribers(encoding: str) -> None:
    with trio.fail_after(10):
        async with running_server(channels=CHANNELS) as server, \
                open_client(server, encoding) as a, open_client(server, encoding) as b:
            assert await members(a, "quiet.1") == []
            before = time.time()
            await a.subscribe("quiet.1")
            await b.subscribe("quiet.1")
            got = await members(b, "quiet.1", ref=7)
            assert [m["conn"] for m in got] == [a.welcome["session"], b.welcome["session"]]
            assert all(m["user"] == "" and before - 1 <= m["joined"] <= time.time() + 1 for m in got)
            assert all("info" not in m for m in got)
            stats = await a.request({"type": "presence_stats", "channel": "quiet.1", "ref": "s"})
            assert stats == {"type": "presence_stats", "channel": "quiet.1", "ref": "s",
                             "connections": 2, "users": 1}
            await a.request({"type": "unsubscribe", "channel": "quiet.1"})
            assert [m["conn"] for m in await members(b, "quiet.1")] == [b.welcome["session"]]
            # Without join_leave nobody was told anything.
            await b.expect_silence(0.1)


async def test_presence_errors_keep_the_connection() -> None:
    with trio.fail_after(10):
        async with running_server(channels=CHANNELS) as server, open_client(server) as c:
            off = await c.request({"type": "presence", "channel": "chat.1", "ref": 1})
            assert off["type"] == "error" and off["code"] == "bad_request" and off["ref"] == 1
            assert "presence is not enabled" in off["message"] and "'*'" in off["message"]
            for bad in ({"type": "presence", "ref": 2}, {"type": "presence_stats", "channel": "", "ref": 2},
                        {"type": "presence", "channel": "a b", "ref": 2},
                        {"type": "presence", "channel": 5, "ref": 2},
                        {"type": "presence_stats", "channel": "x" * 300, "ref": 2}):
                answer = await c.request(bad)
                assert answer["type"] == "error" and answer["code"] == "bad_request" and answer["ref"] == 2
            assert (await c.request({"type": "ping", "ref": "p"}))["type"] == "pong"


async def test_presence_needs_the_permission_to_subscribe_and_shows_user_and_info() -> None:
    with trio.fail_after(10):
        async with running_server(channels=CHANNELS, auth=AuthConfig(jwt_secret=SECRET)) as server:
            alice = bearer(token(channels=["lobby.*"], info={"name": "Alice", "level": 3}))
            bob = bearer(token(sub="bob", channels=["other.*"]))
            async with open_client(server, **alice) as a, open_client(server, **bob) as b:
                await a.subscribe("lobby.1")
                assert (await a.recv())["type"] == "join"
                got = await members(a, "lobby.1")
                assert got == [{"user": "alice", "conn": a.welcome["session"], "joined": got[0]["joined"],
                                "info": {"name": "Alice", "level": 3}}]
                for kind in ("presence", "presence_stats"):
                    answer = await b.request({"type": kind, "channel": "lobby.1", "ref": "x"})
                    assert answer["type"] == "error" and answer["code"] == "forbidden", answer
                    assert answer["ref"] == "x" and "lobby.1" in answer["message"]
                assert (await b.request({"type": "ping", "ref": 1}))["type"] == "pong"


async def test_join_and_leave_reach_subscribers_in_order() -> None:
    with trio.fail_after(10):
        async with running_server(channels=CHANNELS) as server, open_client(server) as watcher:
            await watcher.subscribe("lobby.x")
            me = await watcher.recv()
            assert me == {"type": "join", "channel": "lobby.x", "member": me["member"]}
            assert me["member"]["conn"] == watcher.welcome["session"]
            sessions = []
            for _ in range(3):
                async with open_client(server) as c:
                    await c.subscribe("lobby.x")
                    sessions.append(c.welcome["session"])
            async with open_client(server) as c:
                await c.subscribe("lobby.x")
                await c.request({"type": "unsubscribe", "channel": "lobby.x", "ref": 1})
                sessions.append(c.welcome["session"])
            seen = [(m["type"], m["member"]["conn"]) for m in [await watcher.recv() for _ in range(8)]]
            assert seen == [(kind, s) for s in sessions for kind in ("join", "leave")]


async def test_batched_join_leave_and_the_member_cap() -> None:
    with trio.fail_after(10):
        async with running_server(channels=CHANNELS) as server, open_client(server) as watcher:
            await watcher.subscribe("big.1")
            first = await watcher.recv()
            assert first["type"] == "presence_diff" and first["leaves"] == []
            assert [m["conn"] for m in first["joins"]] == [watcher.welcome["session"]]
            async with AsyncExitStack() as stack:
                clients = [await stack.enter_async_context(open_client(server)) for _ in range(5)]
                for c in clients:
                    await c.subscribe("big.1")
                async with open_client(server) as brief:  # joins and leaves within one interval
                    await brief.subscribe("big.1")
                diff = await watcher.recv()
                # Diffs may split at an interval boundary; together they hold the five joins.
                joins = [m["conn"] for m in diff["joins"]]
                while len(joins) < 5:
                    joins += [m["conn"] for m in (await watcher.recv())["joins"]]
                assert joins == [c.welcome["session"] for c in clients]
            diff = await watcher.recv()
            leaves = [m["conn"] for m in diff["leaves"]]
            while len(leaves) < 5:
                leaves += [m["conn"] for m in (await watcher.recv())["leaves"]]
            assert sorted(leaves) == sorted(c.welcome["session"] for c in clients)
            await watcher.expect_silence(0.25)

            # Above join_leave_max_members = 2 nothing is announced; below it again, it is.
            await watcher.subscribe("capped.1")
            assert (await watcher.recv())["type"] == "join"
            async with open_client(server) as b:
                await b.subscribe("capped.1")
                assert (await watcher.recv())["member"]["conn"] == b.welcome["session"]
                async with open_client(server) as c:
                    await c.subscribe("capped.1")
                    stats = await watcher.request({"type": "presence_stats", "channel": "capped.1"})
                    assert stats["connections"] == 3
                leave = await watcher.recv()  # back to two members: c's leave is announced
                assert leave["type"] == "leave" and leave["member"]["conn"] == c.welcome["session"]


async def _member(server: Any, channel: str, resubscribe: bool, sessions: dict[str, trio.Event],
                  task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """One client in ``channel`` until its event is set (each in its own task, so clients
    can leave in any order)."""
    async with open_client(server) as c:
        await c.subscribe(channel)
        if resubscribe:
            await c.request({"type": "unsubscribe", "channel": channel})
            await c.subscribe(channel)
        leave = sessions[c.welcome["session"]] = trio.Event()
        task_status.started(c.welcome["session"])
        await leave.wait()


async def test_presence_equals_the_connected_set_after_churn() -> None:
    rng = random.Random(8)
    with trio.fail_after(15):
        async with running_server(channels=CHANNELS) as server, open_client(server) as watcher:
            async with trio.open_nursery() as nursery:
                sessions: dict[str, trio.Event] = {}
                alive: set[str] = set()
                for _ in range(80):
                    if alive and rng.random() < 0.4:
                        session = rng.choice(sorted(alive))
                        alive.discard(session)
                        sessions[session].set()
                    else:
                        alive.add(await nursery.start(_member, server, "quiet.churn", rng.random() < 0.2,
                                                      sessions))
                # A disconnect is noticed once the server read the close: wait for it.
                while sorted(m["conn"] for m in await members(watcher, "quiet.churn")) != sorted(alive):
                    await trio.sleep(0.01)
                stats = await watcher.request({"type": "presence_stats", "channel": "quiet.churn"})
                assert stats["connections"] == len(alive) > 5
                for session in alive:
                    sessions[session].set()
            while await members(watcher, "quiet.churn"):
                await trio.sleep(0.01)
            assert not server.hub.presence.book.channels()


async def test_presence_in_stats_and_metrics() -> None:
    from .conftest import http_get

    with trio.fail_after(10):
        async with running_server(channels=CHANNELS) as server, \
                open_client(server) as a, open_client(server) as b:
            await a.subscribe("lobby.m")
            await a.recv()
            await b.subscribe("lobby.m")
            await a.recv()
            await b.recv()
            status, stats = await http_get(server, "/stats")
            assert status == 200
            assert stats["presence"] == {"channels": 1, "members": 2, "announced": 3, "skipped": 0}
            status, text = await http_get(server, "/metrics")
            assert "relay_presence_members 2.0" in text
            assert 'relay_presence_announcements_total{outcome="sent"} 3.0' in text


async def test_event_streams_are_members_and_long_polls_are_not() -> None:
    from .test_fallback import poll, sse

    with trio.fail_after(10):
        async with running_server(channels=CHANNELS) as server, open_client(server) as watcher:
            await watcher.subscribe("lobby.h")
            await watcher.recv()
            async with sse(server, "channel=lobby.h") as events:
                await events.next_of("subscribed")
                joined = await events.next_of("join")  # its own join, as an event of the stream
                stream = joined["data"]["member"]["conn"]
                assert (await watcher.recv())["member"]["conn"] == stream
                assert [m["conn"] for m in await members(watcher, "lobby.h")] == [
                    watcher.welcome["session"], stream]
                status, _ = await poll(server, "channel=lobby.h&timeout=0")
                assert status == 200
                assert len(await members(watcher, "lobby.h")) == 2
            left = await watcher.recv()
            assert left["type"] == "leave" and left["member"]["conn"] == stream
