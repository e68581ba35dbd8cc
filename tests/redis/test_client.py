"""relay's trio Redis client (relay.broker.redis) against a real redis-server: pipelining,
reply order, bounds, a lost connection, pub/sub.

(In this test process ``redis`` is this test package, which shadows redis-py: endpoints are
built directly instead of parsed by redis-py's URL parser.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hiredis
import pytest
import trio

from relay.broker.redis import ConnectionLost, Endpoint, Link, Pipeline, PubSub
from relay.errors import Unavailable

from .conftest import RedisServer, redis_server


def endpoint(redis: RedisServer) -> Endpoint:
    return Endpoint(redis.url, "127.0.0.1", redis.port, 0, None, None, False)


class CountingStream(trio.abc.Stream):
    """A stream that counts the writes it passes on."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sends = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sends += 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_commands_queued_in_one_pass_leave_in_one_write_and_replies_keep_their_order(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with redis_server(tmp_path) as redis:
            link = await Link.open(endpoint(redis), "test")
            counting = CountingStream(link.stream)
            link.stream = counting
            pipeline = Pipeline(link, 10_000)
            replies: list[Any] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipeline.run)
                for i in range(5000):
                    pipeline.submit(("INCR", "n"), replies.append)
                pipeline.submit(("HGET", "n", "x"), replies.append)  # WRONGTYPE: an error reply, in place
                pipeline.submit(("GET", "n"), replies.append)
                with trio.fail_after(10):
                    while len(replies) < 5002:
                        await trio.sleep(0.01)
                assert counting.sends == 1, counting.sends  # 5,002 commands, one write
                assert replies[:5000] == list(range(1, 5001))
                assert isinstance(replies[5000], hiredis.ReplyError) and "WRONGTYPE" in str(replies[5000])
                assert replies[5001] == b"5000"
                assert await pipeline.call("PING") == b"PONG"
                nursery.cancel_scope.cancel()
            await link.aclose()


async def test_the_pipeline_is_bounded_and_a_lost_connection_answers_every_waiting_command(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with redis_server(tmp_path) as redis:
            link = await Link.open(endpoint(redis), "test")
            pipeline = Pipeline(link, 3)
            got: list[Any] = []
            lost: list[BaseException] = []

            async def run() -> None:
                try:
                    await pipeline.run()
                except ConnectionLost as exc:
                    lost.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                for _ in range(3):
                    pipeline.submit(("BLPOP", "never", "0"), got.append)  # waits forever
                with pytest.raises(Unavailable, match="overloaded: 3 commands wait"):
                    pipeline.submit(("PING",), got.append)
                await trio.sleep(0.1)
                await redis.command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
                with trio.fail_after(5):
                    while len(got) < 3:
                        await trio.sleep(0.01)
            assert all(isinstance(r, Unavailable) for r in got), got
            assert lost and "closed the connection" in str(lost[0])
            with pytest.raises(Unavailable, match="unavailable"):
                pipeline.submit(("PING",), got.append)
            await link.aclose()


async def test_pubsub_confirms_subscriptions_in_order_and_hands_over_messages(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with redis_server(tmp_path) as redis:
            link = await Link.open(endpoint(redis), "test-sub")
            messages: list[tuple[bytes, bytes]] = []
            pubsub = PubSub(link, lambda key, payload: messages.append((key, payload)))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pubsub.run)
                first, second = pubsub.subscribe([b"a", b"b"])
                await first.wait()
                await second.wait()
                assert await redis.command("PUBLISH", "a", "1") == 1
                assert await redis.command("PUBLISH", "b", "2") == 1
                await pubsub.ping().wait()  # answered after both messages
                assert messages == [(b"a", b"1"), (b"b", b"2")]
                pubsub.unsubscribe([b"a"])
                await pubsub.ping().wait()
                assert await redis.command("PUBLISH", "a", "3") == 0
                nursery.cancel_scope.cancel()
            await link.aclose()
