"""A Redis Cluster of three masters: channels follow hash slots, messages go through
sharded pub/sub (SPUBLISH / SSUBSCRIBE)."""

from __future__ import annotations

import signal
from pathlib import Path

import hiredis
import trio

from .conftest import client, http, numsub, publish_once_back, redis_cluster, relay_nodes, wait_ready


async def test_nodes_on_a_redis_cluster_deliver_and_recover_through_sharded_pub_sub(tmp_path: Path) -> None:
    channels = [f"table.{i}" for i in range(12)]
    with trio.fail_after(45):
        async with redis_cluster(tmp_path) as masters, \
                relay_nodes(tmp_path, 2, "--redis-cluster", "--redis-url", masters[0].url) as (a, b):
            assert "redis cluster: 3 masters" in a.output
            async with client(a) as sub, client(b, "msgpack") as pub:
                first = {}
                for c in channels:
                    first[c] = await sub.subscribe(c)
                for c in channels:
                    ack = await pub.request({"type": "publish", "channel": c, "data": c, "ref": c})
                    assert ack["type"] == "ack" and ack["offset"] == 1, ack
                got = sorted([(await sub.recv())["data"] for _ in channels])
                assert got == sorted(channels)
                # Each channel's keys and its shard channel live on the master of its slot,
                # and node a listens there once (SSUBSCRIBE), not with plain SUBSCRIBE.
                owners = []
                for c in channels:
                    slot = await masters[0].command("CLUSTER", "KEYSLOT", f"relay:{{{c}}}")
                    here = [m for m in masters if await m.command("CLUSTER", "COUNTKEYSINSLOT", slot) > 0]
                    assert len(here) == 1, (c, here)
                    owners.append(here[0].port)
                    shard = numsub(await here[0].command("PUBSUB", "SHARDNUMSUB", f"relay:{{{c}}}"))
                    assert shard == {f"relay:{{{c}}}": 1}, shard
                    assert numsub(await here[0].command("PUBSUB", "NUMSUB", f"relay:{{{c}}}")) == {
                        f"relay:{{{c}}}": 0}
                assert len(set(owners)) == 3, "the channels did not spread over the masters"
            status, _ = await http(b, "POST", "/api/publish", {"channel": channels[0], "data": "later"})
            assert status == 200
            async with client(b) as back:
                answer = await back.subscribe(
                    channels[0], since={"epoch": first[channels[0]]["epoch"], "offset": 1})
                assert answer["recovered"] is True and answer["offset"] == 2, answer
                assert (await back.recv())["data"] == "later"
            await wait_ready(a)


async def test_a_failover_that_lost_writes_starts_a_new_epoch_the_nodes_follow(tmp_path: Path) -> None:
    """The owner's replica misses the last two publishes (frozen), the owner dies and the
    replica takes over (CLUSTER FAILOVER FORCE): offsets 4 and 5 would be reused with other
    data, so the promoted master's first publish starts a new epoch, which the nodes follow
    without restarting and the subscriber is told of."""
    with trio.fail_after(60):
        async with redis_cluster(tmp_path, masters=3, replicas=1) as servers, \
                relay_nodes(tmp_path, 2, "--redis-cluster", "--redis-url", servers[0].url) as (a, b):
            channel = "match.42"
            slot = await servers[0].command("CLUSTER", "KEYSLOT", f"relay:{{{channel}}}")
            by_port = {s.port: s for s in servers}

            async def owner() -> int:
                for server in servers:
                    if server.proc is not None and server.proc.returncode is None:
                        try:
                            for start, end, master, *_ in await server.command("CLUSTER", "SLOTS"):
                                if start <= slot <= end:
                                    return int(master[1])
                        except OSError:
                            continue
                raise AssertionError("no live node answers CLUSTER SLOTS")

            async with client(a) as sub:
                first = await sub.subscribe(channel, ref=1)
                for i in range(3):
                    status, _ = await http(b, "POST", "/api/publish", {"channel": channel, "data": i})
                    assert status == 200
                assert [(await sub.recv())["offset"] for _ in range(3)] == [1, 2, 3]
                master = by_port[await owner()]
                roles = [(s, await s.command("ROLE")) for s in servers]
                (replica,) = [s for s, role in roles if role[:3] == ["slave", "127.0.0.1", master.port]]
                await master.replicated(f"relay:{{{channel}}}:test")  # the replica has offsets 1-3
                assert replica.proc is not None
                # ... and will never get 4 and 5: frozen, and its link to the master cut (what
                # the master had sent before would still wait in the replica's socket).
                replica.proc.send_signal(signal.SIGSTOP)
                try:
                    assert await master.command("CLIENT", "KILL", "TYPE", "replica") == 1
                    for i in (3, 4):
                        status, body = await http(b, "POST", "/api/publish", {"channel": channel, "data": i})
                        assert status == 200 and body["epoch"] == first["epoch"], body
                    assert [(await sub.recv())["offset"] for _ in range(2)] == [4, 5]
                    await master.kill()
                finally:
                    replica.proc.send_signal(signal.SIGCONT)
                with trio.fail_after(10):
                    while True:
                        try:
                            assert await replica.command("CLUSTER", "FAILOVER", "FORCE") == "OK"
                            break
                        except hiredis.ReplyError:
                            await trio.sleep(0.05)  # (not yet talking to the cluster again)
                body = await publish_once_back(b, channel, "after", 20)  # relay follows the new owner
                assert await owner() == replica.port
                # Offsets continue after what the replica had, under a new epoch.
                assert body["epoch"] != first["epoch"] and body["offset"] == 4, body
                got = await sub.recv(timeout=10)
                assert got == {"type": "message", "channel": channel, "offset": 4, "data": "after",
                               "epoch": body["epoch"]}, got
                async with client(b) as late:
                    lost = await late.subscribe(channel, since={"epoch": first["epoch"], "offset": 5})
                    assert lost["recovered"] is False and lost["epoch"] == body["epoch"], lost
                    assert lost["offset"] == 4, lost
            await wait_ready(a)
            await wait_ready(b)
