"""A Redis Cluster of three masters: channels follow hash slots, messages go through
sharded pub/sub (SPUBLISH / SSUBSCRIBE)."""

from __future__ import annotations

from pathlib import Path

import trio

from .conftest import client, http, numsub, redis_cluster, relay_nodes, wait_ready


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
