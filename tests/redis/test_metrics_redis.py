"""The Redis bridge in /metrics: shard up or down, reconnections, publish round trips
(parsed with prometheus-client's own parser)."""

from __future__ import annotations

from pathlib import Path

import trio

from server.test_security_metrics import samples

from .conftest import http, redis_server, relay_nodes, wait_ready


async def _samples(node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:  # type: ignore[no-untyped-def]
    status, text = await http(node, "GET", "/metrics")
    assert status == 200
    return samples(text)


async def test_redis_state_reconnections_and_publish_latency_are_exported(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with redis_server(tmp_path) as redis, relay_nodes(tmp_path, 1, "--redis-url", redis.url) as (node,):
            shard = (("shard", f"127.0.0.1:{redis.port}/0"),)
            for n in range(5):
                status, body = await http(node, "POST", "/api/publish", {"channel": "m", "data": n})
                assert status == 200, body
            got = await _samples(node)
            assert got[("relay_redis_up", shard)] == 1.0
            assert got[("relay_redis_connects_total", shard)] == 1.0
            assert got[("relay_redis_publish_seconds_count", ())] == 5.0
            assert 0 < got[("relay_redis_publish_seconds_sum", ())] < 5.0
            await redis.kill()
            await wait_ready(node, ready=False)
            got = await _samples(node)
            assert got[("relay_redis_up", shard)] == 0.0
            # a publish that fails is answered 503 and not timed as a success
            status, body = await http(node, "POST", "/api/publish", {"channel": "m", "data": "lost?"})
            assert status == 503, body
            assert (await _samples(node))[("relay_redis_publish_seconds_count", ())] == 5.0
            await redis.start()
            await wait_ready(node)
            got = await _samples(node)
            assert got[("relay_redis_up", shard)] == 1.0
            assert got[("relay_redis_connects_total", shard)] == 2.0
