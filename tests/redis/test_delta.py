"""State deltas across two ``relay serve`` nodes on one real Redis: each node patches from
the value it delivered last (a full value when it did not see the previous offset), and
delta subscribers, full-value subscribers and the Python client all end on the same value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from relay.client import connect
from relay.core import mergepatch

from .conftest import client, redis_server, relay_nodes

CONFIG = """
[limits]
messages_per_second = 0
bytes_per_second = 0

[[channels]]
pattern = "game.*"
mode = "state"
delta = true
"""


def _world(tick: int) -> dict[str, Any]:
    return {"tick": tick, "units": {f"u{i}": {"x": i + (tick if i == tick % 30 else 0), "hp": 100}
                                    for i in range(30)}}


async def test_two_nodes_deliver_patches_that_apply(tmp_path: Path) -> None:
    channel = "game.lobby"
    with trio.fail_after(30):
        async with redis_server(tmp_path) as redis, \
                relay_nodes(tmp_path, 2, "--redis-url", redis.url, config=CONFIG) as (a, b):
            async with client(a) as pa, client(b, "msgpack") as pb, client(a) as da, \
                    client(b, "msgpack") as db, client(b) as full, \
                    connect(b.url, encoding="msgpack") as py:
                await pa.publish(channel, _world(0))
                assert (await da.subscribe(channel, delta=True))["delta"] is True
                assert (await db.subscribe(channel, delta=True))["delta"] is True
                assert "delta" not in await full.subscribe(channel)
                sub = await py.subscribe(channel)
                await sub.wait_subscribed()
                state: dict[Any, dict[str, Any]] = {da: {}, db: {}}
                patches = {da: 0, db: 0}
                for i in range(1, 41):
                    pub = pa if i % 2 else pb  # both nodes publish, in turn
                    await pub.publish(channel, _world(i), ref=i)
                for c in (da, db):
                    st = state[c]
                    while st.get("offset") != 41:
                        msg = await c.recv()
                        assert msg["type"] == "message", msg
                        if msg.get("delta"):
                            assert msg["base"] == st["offset"] == msg["offset"] - 1
                            st["value"] = mergepatch.apply(st["value"], msg["data"])
                            patches[c] += 1
                        else:
                            st["value"] = msg["data"]
                        st["offset"] = msg["offset"]
                        assert st["value"] == _world(msg["offset"] - 1)
                while (msg := await full.recv())["offset"] != 41:
                    assert "delta" not in msg
                assert msg["data"] == _world(40)
                got = None
                while got is None or got.offset != 41:
                    got = await sub.__anext__()
                    assert got.data == _world(got.offset - 1)
                assert sub.statistics().resyncs == 0
                # Each node patched from the value it had delivered.
                assert patches[da] >= 35 and patches[db] >= 35, patches
