"""A Redis that comes back from a restart (or a failover, tests/redis/test_cluster.py) may
have lost its last writes while the channel's meta hash survived: the first script run on
the new server incarnation starts a new epoch, offsets continuing after what Redis kept, so
offsets it hands out again are never taken for ones the clients already have."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from relay.client import Message, RecoveryLost, connect
from server.test_subprocess import RelayProcess

from .conftest import RedisServer, client, http, redis_server, relay_nodes, wait_ready


async def publish(node: RelayProcess, channel: str, data: Any) -> dict[str, Any]:
    status, body = await http(node, "POST", "/api/publish", {"channel": channel, "data": data})
    assert status == 200, (status, body)
    return body  # type: ignore[no-any-return]


async def restart(redis: RedisServer, *, clean: bool) -> None:
    """SIGKILL (what was written after the last SAVE is lost), or a clean SHUTDOWN SAVE;
    then the same port and directory: Redis loads dump.rdb."""
    if clean:
        assert redis.proc is not None
        try:
            await redis.command("SHUTDOWN", "SAVE")
        except OSError:
            pass  # (it closes the connection instead of answering)
        await redis.proc.wait()
    else:
        await redis.kill()
    await redis.start()


async def test_a_restart_that_lost_writes_starts_a_new_epoch_and_reused_offsets_are_delivered(
        tmp_path: Path) -> None:
    channel = "orders"
    with trio.fail_after(30):
        async with redis_server(tmp_path) as redis, \
                relay_nodes(tmp_path, 2, "--redis-url", redis.url) as (a, b):
            async with client(a) as sub, connect(a.url, min_backoff=0.01, max_backoff=0.05) as py:
                first = await sub.subscribe(channel, ref=1)
                pysub = await py.subscribe(channel)
                await pysub.wait_subscribed()
                for i in range(1, 11):
                    await publish(b, channel, i)
                assert await redis.command("SAVE") == "OK"  # the snapshot has offsets 1-10
                for i in range(11, 16):
                    await publish(b, channel, i)
                got = [await sub.recv() for _ in range(15)]
                assert [(m["offset"], m["data"]) for m in got] == [(i, i) for i in range(1, 16)]
                for i in range(1, 16):
                    assert await pysub.__anext__() == Message(channel, i, i, first["epoch"])

                await restart(redis, clean=False)  # comes back with offsets 1-10 only
                for node in (a, b):
                    await wait_ready(node)
                ack = await publish(b, channel, "after")
                # Offset 11 again, with other data: a new epoch says so.
                assert ack["epoch"] != first["epoch"] and ack["offset"] == 11, ack
                # Both subscribers (they had offset 15) get it, told of the new epoch.
                assert await sub.recv() == {"type": "message", "channel": channel, "offset": 11,
                                            "data": "after", "epoch": ack["epoch"]}
                with pytest.raises(RecoveryLost) as info:
                    await pysub.__anext__()
                lost = info.value
                assert (lost.old_epoch, lost.old_offset, lost.new_epoch, lost.new_offset) == (
                    first["epoch"], 15, ack["epoch"], 10)
                assert await pysub.__anext__() == Message(channel, 11, "after", ack["epoch"])

            # Recovery from the old epoch is refused, on either node, even from an offset
            # Redis kept (conservative); from the new epoch it works as always.
            for node, since in ((a, 15), (b, 10), (b, 3)):
                async with client(node) as late:
                    answer = await late.subscribe(channel, since={"epoch": first["epoch"], "offset": since})
                    assert answer["recovered"] is False, answer
                    assert (answer["epoch"], answer["offset"]) == (ack["epoch"], 11), answer
                    await late.expect_silence(0.05)
            async with client(a) as fresh:
                answer = await fresh.subscribe(channel, since={"epoch": ack["epoch"], "offset": 10})
                assert answer["recovered"] is True and answer["offset"] == 11, answer
                assert (await fresh.recv())["data"] == "after"
            # What Redis kept is the new epoch's history up to where it began.
            status, history = await http(a, "GET", f"/api/channels/{channel}/history?limit=3")
            assert status == 200, history
            assert history["epoch"] == ack["epoch"] and history["offset"] == 11
            assert [(p["offset"], p["data"]) for p in history["publications"]] == [
                (9, 9), (10, 10), (11, "after")]
            assert "Traceback" not in a.output + b.output


async def test_a_clean_restart_that_lost_nothing_starts_a_new_epoch_too(tmp_path: Path) -> None:
    """relay cannot tell a snapshot that has every write from one that misses some: clients
    resynchronise once (``recovered: false``) rather than ever lose messages silently."""
    channel = "quiet"
    with trio.fail_after(30):
        async with redis_server(tmp_path) as redis, \
                relay_nodes(tmp_path, 1, "--redis-url", redis.url) as (a,):
            async with client(a) as sub:
                first = await sub.subscribe(channel, ref=1)
                for i in range(1, 4):
                    await publish(a, channel, i)
                    if i == 1:  # as written by a relay that kept no incarnation: adopted as is
                        assert await redis.command("HDEL", f"relay:{{{channel}}}:m", "r") == 1
                assert [(await sub.recv())["offset"] for _ in range(3)] == [1, 2, 3]
                run_id = (await redis.command("INFO", "server")).split("run_id:")[1].split()[0]
                meta = await redis.command("HGETALL", f"relay:{{{channel}}}:m")
                assert dict(zip(meta[::2], meta[1::2])) == {"e": first["epoch"], "s": "3", "r": run_id}
                await restart(redis, clean=True)  # SHUTDOWN SAVE: nothing lost
                await wait_ready(a)
                async with client(a) as back:
                    answer = await back.subscribe(channel, since={"epoch": first["epoch"], "offset": 3})
                    assert answer["recovered"] is False and answer["epoch"] != first["epoch"], answer
                    assert answer["offset"] == 3, answer
                ack = await publish(a, channel, 4)
                assert (ack["epoch"], ack["offset"]) == (answer["epoch"], 4), ack
                assert await sub.recv() == {"type": "message", "channel": channel, "offset": 4,
                                            "data": 4, "epoch": ack["epoch"]}


async def test_a_state_channel_keeps_the_value_redis_kept_under_the_new_epoch(tmp_path: Path) -> None:
    """The node that had delivered values 4 and 5 (lost with the restart) gives a new
    subscriber the value Redis kept (3), under the new epoch, not its own stale 5."""
    config = '[[channels]]\npattern = "game.*"\nmode = "state"\n'
    with trio.fail_after(30):
        async with redis_server(tmp_path) as redis, \
                relay_nodes(tmp_path, 1, "--redis-url", redis.url, config=config) as (a,):
            async with client(a) as member:
                first = await member.subscribe("game.1", ref=1)
                for i in range(1, 6):
                    await publish(a, "game.1", i)
                    if i == 3:
                        assert await redis.command("SAVE") == "OK"
                while (await member.recv())["offset"] != 5:
                    pass
                await restart(redis, clean=False)
                await wait_ready(a)
                async with client(a) as late:
                    answer = await late.subscribe("game.1")
                    assert answer["epoch"] != first["epoch"] and answer["offset"] == 3, answer
                    assert await late.recv() == {"type": "message", "channel": "game.1", "offset": 3, "data": 3}
