"""Channels spread over several Redis servers by consistent hashing."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from relay.broker.ring import HashRing

from .conftest import client, http, redis_server, relay_nodes

CHANNELS = [f"room.{i}" for i in range(2000)]


def test_every_channel_has_one_shard_and_the_load_is_spread() -> None:
    ring = HashRing(["r1:6379/0", "r2:6379/0", "r3:6379/0"])
    owners = [ring.shard_of(c) for c in CHANNELS]
    counts = [owners.count(i) for i in range(3)]
    assert all(400 < n < 950 for n in counts), counts
    again = HashRing(["r1:6379/0", "r2:6379/0", "r3:6379/0"])  # the same on every node
    assert owners == [again.shard_of(c) for c in CHANNELS]


def test_adding_a_shard_moves_only_the_channels_the_new_shard_takes() -> None:
    before = HashRing(["r1:6379/0", "r2:6379/0"])
    after = HashRing(["r1:6379/0", "r2:6379/0", "r3:6379/0"])
    moved = [c for c in CHANNELS if before.shard_of(c) != after.shard_of(c)]
    assert all(after.shard_of(c) == 2 for c in moved), "a channel moved between old shards"
    assert 0.2 < len(moved) / len(CHANNELS) < 0.47, len(moved)


@pytest.mark.parametrize("shards", [[], ["a", "a"]], ids=["none", "duplicate"])
def test_a_ring_needs_distinct_shards(shards: list[str]) -> None:
    with pytest.raises(ValueError):
        HashRing(shards)


async def test_two_redis_servers_share_the_channels_and_every_node_agrees(tmp_path: Path) -> None:
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    channels = [f"room.{i}" for i in range(24)]
    with trio.fail_after(30):
        async with redis_server(tmp_path / "r1") as r1, redis_server(tmp_path / "r2") as r2, \
                relay_nodes(tmp_path, 2, "--redis-url", r1.url, "--redis-url", r2.url) as (a, b):
            async with client(a) as sub:
                for c in channels:
                    await sub.subscribe(c)
                for c in channels:
                    status, body = await http(b, "POST", "/api/publish", {"channel": c, "data": c})
                    assert status == 200 and body["offset"] == 1, body
                got = sorted([(await sub.recv())["data"] for _ in channels])
                assert got == sorted(channels)
            where = {c: (await r1.command("EXISTS", f"relay:{{{c}}}:s"),
                         await r2.command("EXISTS", f"relay:{{{c}}}:s")) for c in channels}
            assert all(sum(v) == 1 for v in where.values()), where  # each channel on one server
            on_r1 = sum(v[0] for v in where.values())
            assert 0 < on_r1 < len(channels), "all channels landed on one server"
