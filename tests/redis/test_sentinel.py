"""A master found through Redis Sentinel (``redis+sentinel://``): when the master dies and
the Sentinel promotes its replica, the nodes ask the Sentinel again, reach the new master,
and its other incarnation starts a new epoch their subscribers are told of."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import trio

from client.conftest import free_port

from .conftest import SentinelServer, client, http, publish_once_back, redis_server, relay_nodes, wait_ready


async def test_nodes_follow_a_sentinel_failover_to_the_promoted_replica(tmp_path: Path) -> None:
    name, channel = "relaymaster", "feed"
    with trio.fail_after(30):
        async with AsyncExitStack() as stack:
            for server in ("master", "replica", "sentinel"):
                (tmp_path / server).mkdir()
            # (no 5 s wait for more replicas before the first sync)
            master = await stack.enter_async_context(redis_server(
                tmp_path / "master", None, "--repl-diskless-sync-delay", "0"))
            replica = await stack.enter_async_context(redis_server(
                tmp_path / "replica", None, "--replicaof", "127.0.0.1", str(master.port)))
            while "master_link_status:up" not in await replica.command("INFO", "replication"):
                await trio.sleep(0.02)
            sentinel = SentinelServer(free_port(), tmp_path / "sentinel", master.port, name, "sentinel-pw")
            await sentinel.start()
            stack.push_async_callback(sentinel.stop)
            while not await sentinel.command("SENTINEL", "REPLICAS", name):
                await trio.sleep(0.02)  # it learns of the replica from the master's INFO
            # The first address is a Sentinel that is not there: the next one is asked (with
            # its password).
            url = (f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{sentinel.port}/{name}"
                   "?sentinel_password=sentinel-pw")
            a, b = await stack.enter_async_context(relay_nodes(tmp_path, 2, "--redis-url", url))
            assert f"master at 127.0.0.1:{master.port}" in a.output, a.output
            async with client(a) as sub:
                first = await sub.subscribe(channel, ref=1)
                for i in range(1, 4):
                    status, ack = await http(b, "POST", "/api/publish", {"channel": channel, "data": i})
                    assert status == 200 and ack["epoch"] == first["epoch"], ack
                assert [(await sub.recv())["offset"] for _ in range(3)] == [1, 2, 3]
                await master.replicated()

                await master.kill()
                ack = await publish_once_back(b, channel, "after", 15)  # the Sentinel promotes the replica
                assert (await replica.command("ROLE"))[0] == "master"
                assert ack["epoch"] != first["epoch"] and ack["offset"] == 4, ack
                assert await sub.recv(timeout=10) == {"type": "message", "channel": channel, "offset": 4,
                                                      "data": "after", "epoch": ack["epoch"]}
            for node in (a, b):
                await wait_ready(node)
                assert f"master at 127.0.0.1:{replica.port}" in node.output, node.output[-3000:]
                assert "Traceback" not in node.output, node.output
                assert "sentinel-pw" not in node.output and "sentinel_password=***" in node.output
