"""Keyed conflation (channel option ``conflate_key``) from outside: among fast subscribers
that get every update, a stalled one ends up with the newest value of every symbol, never
an older value after a newer one; publishes without the key are refused."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from .conftest import http_post_json, open_client, running_server
from .test_slow_consumer import MAX_MESSAGE, N_MESSAGES, PAYLOAD, SEND_QUEUE, _fast_subscriber, _stalled_raw_subscriber

SYMBOLS = [f"SYM{i:03d}" for i in range(50)]
TICKS = [{"pattern": "ticks.*", "conflate_key": "symbol"}]


def _tick(i: int) -> dict[str, Any]:
    return {"symbol": SYMBOLS[i % len(SYMBOLS)], "n": i, "pad": "x" * PAYLOAD}


async def test_a_stalled_subscriber_gets_the_newest_value_of_every_symbol_fast_ones_get_all() -> None:
    channel = "ticks.eq"
    n = max(N_MESSAGES, 4 * len(SYMBOLS))
    with trio.fail_after(120):
        async with running_server(send_queue_size=SEND_QUEUE, max_message_size=MAX_MESSAGE,
                                  channels=TICKS) as server:
            slow = await _stalled_raw_subscriber(server, channel)
            try:
                # the fast subscriber checks offsets 1..n in order with data n == offset
                async with _fast_subscriber(server, channel, n), open_client(server) as pub:
                    for i in range(1, n + 1):
                        ack = await pub.publish(channel, _tick(i), ref=i)
                        assert ack["offset"] == i, ack
                newest: dict[str, int] = {}
                received = 0
                while len(newest) < len(SYMBOLS) or any(newest[s] < n - len(SYMBOLS) + 1 for s in SYMBOLS):
                    msg = await slow.recv_json()
                    assert msg["type"] == "message", msg["type"]
                    data = msg["data"]
                    assert data["n"] == msg["offset"]
                    previous = newest.get(data["symbol"], 0)
                    assert data["n"] > previous, f"stale {data['symbol']}: {data['n']} after {previous}"
                    newest[data["symbol"]] = data["n"]
                    received += 1
                # every symbol ends at its last published value
                last = {SYMBOLS[i % len(SYMBOLS)]: i for i in range(1, n + 1)}
                assert newest == last
                assert received < n, "nothing was conflated; publish more"
                # Caught up, it is no longer behind: two updates of one symbol published in one
                # go (one read pass, one flush) both arrive, neither conflated.
                async with open_client(server) as pub:
                    for i in (n + 1, n + 1 + len(SYMBOLS)):
                        await pub.send({"type": "publish", "channel": channel, "data": _tick(i)})
                    got = [await slow.recv_json() for _ in range(2)]
                    assert [m["offset"] for m in got] == [n + 1, n + 2], got
                # and the connection is fine
                await slow.send_json({"type": "ping", "ref": "p"})
                while (msg := await slow.recv_json())["type"] != "pong":
                    pass
            finally:
                await slow.aclose()


@pytest.mark.parametrize("data", [{"n": 1}, [1, 2], "AAPL", {"symbol": None}, {"symbol": True}, {"symbol": [1]}])
async def test_a_publish_without_the_conflation_key_is_refused_over_websocket_and_http(data: Any) -> None:
    with trio.fail_after(10):
        async with running_server(channels=TICKS) as server:
            async with open_client(server) as sub, open_client(server) as pub:
                await sub.subscribe("ticks.eq")
                answer = await pub.request({"type": "publish", "channel": "ticks.eq", "data": data, "ref": 9})
                assert answer["type"] == "error" and answer["code"] == "bad_request" and answer["ref"] == 9
                assert "'symbol'" in answer["message"], answer
                status, body = await http_post_json(server, "/api/publish", {"channel": "ticks.eq", "data": data})
                assert status == 400 and body["error"] == "bad_request", body
                # nothing was published; a good one still is, with offset 1
                ack = await pub.publish("ticks.eq", {"symbol": "AAPL", "px": 1.5}, ref=10)
                assert ack["offset"] == 1
                msg = await sub.recv()
                assert msg["offset"] == 1 and msg["data"] == {"symbol": "AAPL", "px": 1.5}
                # other channels are not affected
                assert (await pub.publish("chat", [1, 2], ref=11))["offset"] == 1
