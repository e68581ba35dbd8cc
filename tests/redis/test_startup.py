"""A node started before its Redis is reachable refuses WebSocket clients (503, Retry-After)
until Redis has been up once, so a load balancer sends them to a node that can serve them;
an outage after that does not refuse clients (they get ``unavailable`` per request)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from websockets.exceptions import InvalidStatus
from websockets.trio.client import connect

from client.conftest import free_port
from server.test_subprocess import child_env, relay_process

from .conftest import RedisServer, client, readyz, wait_ready


async def test_clients_are_refused_until_redis_was_reachable_once(tmp_path: Path) -> None:
    with trio.fail_after(40):
        redis = RedisServer(free_port(), tmp_path)
        async with AsyncExitStack() as stack:
            node = await stack.enter_async_context(relay_process(
                tmp_path, "--port", "0", "--node-id", "n", "--redis-url", redis.url, env=child_env()))
            await node.started()
            status, body = await readyz(node)
            assert status == 503, body
            with pytest.raises(InvalidStatus) as info:
                async with connect(node.url):
                    pass
            response = info.value.response
            assert response.status_code == 503 and response.headers["Retry-After"] == "1"
            assert b"starting" in response.body and b"redis" in response.body, response.body
            await redis.start()
            try:
                await wait_ready(node)
                async with client(node) as c:
                    assert (await c.subscribe("s", ref=1))["type"] == "subscribed"
                await redis.kill()
                await wait_ready(node, ready=False)
                # after it was up once, an outage does not refuse clients
                async with client(node) as late:
                    refused = await late.request({"type": "subscribe", "channel": "t", "ref": 2})
                    assert refused["type"] == "error" and refused["code"] == "unavailable", refused
            finally:
                with trio.CancelScope(shield=True):
                    await redis.stop()
