"""The Python client on delta channels: it asks for deltas, applies the patches and hands the
application full values (its own copies); when a patch does not apply to the value it holds
(conflation, a gap) it fetches the full value again, and never shows a wrong value."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from relay.client import Message, connect

from .conftest import running_server

DELTA = {"pattern": "game.*", "mode": "state", "delta": True}
FAST = {"min_backoff": 0.01, "max_backoff": 0.05}


def _book(i: int) -> dict[str, Any]:
    """An order book of 20 levels per side; update i moves one level on each side."""
    return {
        "seq": i,
        "bids": {f"{100 - k}": (5 + (i if k == i % 20 else 0)) for k in range(20)},
        "asks": {f"{101 + k}": (7 + (i if k == (i * 7) % 20 else 0)) for k in range(20)},
        "venue": "XNAS",
    }


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_patches_are_applied_transparently(encoding: str) -> None:
    with trio.fail_after(15):
        async with running_server(channels=[DELTA]) as server, \
                connect(server.url, encoding=encoding) as c, connect(server.url) as pub:
            await pub.publish("game.book", _book(0))
            sub = await c.subscribe("game.book")
            first = await sub.__anext__()
            assert first.data == _book(0) and sub._delta
            first.data["bids"].clear()  # the application may change what it got
            for i in range(1, 31):
                ack = await pub.publish("game.book", _book(i))
                got = await sub.__anext__()
                assert got == Message("game.book", ack.offset, _book(i), ack.epoch)
                got.data["asks"]["999"] = 1
            assert sub.statistics().resyncs == 0 and sub.statistics().duplicates == 0


async def test_a_client_behind_on_a_conflating_channel_ends_with_the_newest_value() -> None:
    static = "s" * 3000
    values = {i: {"n": i, "blob": f"{i:06d}" * 1000, "static": static} for i in range(1, 61)}
    with trio.fail_after(15):
        async with running_server(channels=[DELTA], send_queue_size=32 * 1024,
                                  max_message_size=16 * 1024) as server, \
                connect(server.url, **FAST) as c:
            sub = await c.subscribe("game.big")
            await sub.wait_subscribed()
            now = trio.current_time()
            for i in range(1, 61):  # in one scheduling pass: the outbox overflows, conflates
                server.hub.publish("game.big", values[i], now)
            seen: list[int] = []
            while not seen or seen[-1] != 60:
                msg = await sub.__anext__()
                assert msg.data == values[msg.offset], msg.offset  # never a wrong value
                assert not seen or msg.offset > seen[-1]
                seen.append(msg.offset)
            assert len(seen) < 60, "nothing was conflated"
            assert sub.statistics().resyncs == 0  # the server kept the full value
            # and it keeps following with patches afterwards
            for i in range(61, 64):
                values[i] = {"n": i, "blob": f"{i:06d}" * 1000, "static": static}
                server.hub.publish("game.big", values[i], trio.current_time())
                assert (await sub.__anext__()).data == values[i]


async def test_a_missed_patch_is_detected_and_the_full_value_fetched() -> None:
    # On a "drop" channel a subscriber that fell behind gets a gap; the next patch's base is
    # a value it never got, so the client resubscribes for the full value.
    channel_opts = {**DELTA, "slow_consumer": "drop"}
    static = "s" * 3000
    with trio.fail_after(15):
        async with running_server(channels=[channel_opts], send_queue_size=32 * 1024,
                                  max_message_size=16 * 1024) as server, \
                connect(server.url, **FAST) as c:
            sub = await c.subscribe("game.drop", on_recovery_lost="event")
            await sub.wait_subscribed()
            values = {i: {"n": i, "blob": f"{i:06d}" * 1000, "static": static} for i in range(1, 41)}
            now = trio.current_time()
            for i in range(1, 31):
                server.hub.publish("game.drop", values[i], now)
            await trio.sleep(0.2)  # written; the gap reported
            for i in range(31, 41):
                server.hub.publish("game.drop", values[i], trio.current_time())
                await trio.sleep(0.01)
            seen = []
            while not seen or seen[-1] != 40:
                msg = await sub.__anext__()
                assert msg.data == values[msg.offset], msg.offset
                seen.append(msg.offset)
            assert sub.statistics().resyncs >= 1, (seen, sub.statistics())
