"""Channel ticks (the channel option ``tick_ms``): a channel's messages leave once per tick
as one frame holding the array of the tick's messages, built once and shared by every
member; a state channel keeps only its newest value per tick. Subscribing mid-tick loses
and repeats nothing; SSE gets one event per message; the Python client unpacks a channel's
tick inside a connection's tick."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
import trio

from relay.client import Message, connect
from relay.config import ChannelOptions, Config, load_config
from relay.errors import ConfigError

from .conftest import check_ts, open_client, running_server
from .test_fallback import sse

TICKED = [{"pattern": "feed.*", "tick_ms": 50}, {"pattern": "price.*", "mode": "state", "tick_ms": 50}]


async def _frames_until(client: Any, offset: int) -> tuple[int, list[dict[str, Any]]]:
    """Read frames until a message with ``offset`` arrived: (frames, messages)."""
    frames, got = 0, []
    while not got or got[-1]["offset"] < offset:
        with trio.fail_after(5):
            raw = await client.ws.recv()
        decoded = msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)
        frames += 1
        for msg in decoded if isinstance(decoded, list) else [decoded]:
            if msg["type"] in ("message", "poke"):
                check_ts(msg)
                got.append(msg)
    return frames, got


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_a_ticked_channel_sends_one_array_frame_per_tick_and_loses_nothing(encoding: str) -> None:
    with trio.fail_after(15):
        async with running_server(channels=TICKED) as server, \
                open_client(server, encoding) as a, open_client(server, "json") as b, open_client(server) as pub:
            await a.subscribe("feed.1")
            await b.subscribe("feed.1")
            for i in range(1, 41):  # pipelined: read in one or two passes, well inside a tick
                await pub.send({"type": "publish", "channel": "feed.1", "data": {"n": i}})
            for sub in (a, b):
                frames, got = await _frames_until(sub, 40)
                assert [(m["offset"], m["data"]["n"]) for m in got] == [(i, i) for i in range(1, 41)]
                assert frames <= 4, frames  # (40 messages, a tick or two)
            assert server.hub.get("feed.1").pending == []  # type: ignore[union-attr]


async def test_a_ticked_state_channel_keeps_the_newest_value_per_tick() -> None:
    with trio.fail_after(15):
        async with running_server(channels=TICKED) as server, open_client(server) as a, open_client(server) as pub:
            await a.subscribe("price.eur")
            for i in range(1, 31):
                await pub.send({"type": "publish", "channel": "price.eur", "data": i})
            frames, got = await _frames_until(a, 30)
            offsets = [m["offset"] for m in got]
            assert offsets == sorted(set(offsets)) and got[-1]["data"] == 30
            assert len(got) == frames < 30, (frames, offsets)  # one value per tick frame


async def test_subscribing_mid_tick_gets_each_message_once() -> None:
    """Messages of the tick under way go to the members they were published to as soon as
    someone joins; the newcomer gets them from history: nobody gets one twice."""
    with trio.fail_after(15):
        async with running_server(channels=TICKED) as server, \
                open_client(server) as early, open_client(server) as late, open_client(server) as pub:
            subscribed = await early.subscribe("feed.2")
            for i in range(1, 4):
                await pub.publish("feed.2", i, ref=i)
            assert len(server.hub.get("feed.2").pending) == 3  # type: ignore[union-attr]
            await late.send({"type": "subscribe", "channel": "feed.2",
                             "since": {"epoch": subscribed["epoch"], "offset": 0}})
            for i in range(4, 7):
                await pub.publish("feed.2", i, ref=i)
            _, early_got = await _frames_until(early, 6)
            assert [m["data"] for m in early_got] == [1, 2, 3, 4, 5, 6]
            late_got: list[Any] = []
            while not late_got or late_got[-1]["offset"] < 6:
                with trio.fail_after(5):
                    decoded = json.loads(await late.ws.recv())
                for msg in decoded if isinstance(decoded, list) else [decoded]:
                    if msg["type"] == "subscribed":
                        assert msg["recovered"] is True
                    else:
                        late_got.append(msg)
            assert [m["data"] for m in late_got] == [1, 2, 3, 4, 5, 6]


async def test_sse_gets_one_event_per_message_of_a_ticked_channel() -> None:
    with trio.fail_after(15):
        async with running_server(channels=TICKED) as server, \
                sse(server, "channel=feed.3") as events, open_client(server) as pub:
            await events.next_of("subscribed")
            for i in range(1, 6):
                await pub.send({"type": "publish", "channel": "feed.3", "data": i})
            got = [await events.next_of("message") for _ in range(5)]
            assert [e["data"]["data"] for e in got] == [1, 2, 3, 4, 5]
            assert got[-1]["id"].endswith(":5")


async def test_python_client_unpacks_a_channel_tick_inside_a_connection_tick() -> None:
    with trio.fail_after(15):
        async with running_server(channels=TICKED) as server, \
                connect(server.url, tick_ms=20) as c, open_client(server) as pub:
            sub = await c.subscribe("feed.4")
            await sub.wait_subscribed()
            for i in range(1, 21):
                await pub.send({"type": "publish", "channel": "feed.4", "data": i})
            got = [await sub.__anext__() for _ in range(20)]
            assert got == [Message("feed.4", i, i, sub.epoch or "") for i in range(1, 21)]


@pytest.mark.parametrize(("table", "needle"), [
    ({"tick_ms": 5}, "tick_ms"),
    ({"tick_ms": 2000}, "tick_ms"),
    ({"tick_ms": 50, "conflate_key": "symbol"}, "conflate_key"),
    ({"tick_ms": 50, "slow_consumer": "drop"}, "drop"),
    ({"tick_ms": 50, "mode": "state", "delta": True}, "delta"),
])
def test_bad_tick_options_are_refused_naming_the_key(tmp_path: Any, table: dict[str, Any], needle: str) -> None:
    lines = ['[[channels]]', 'pattern = "x.*"'] + [
        f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in table.items()]
    path = tmp_path / "relay.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    message = str(info.value)
    assert "channels[0].tick_ms" in message and needle in message and "relay.toml" in message, message


def test_channel_options_default_to_no_ticks() -> None:
    assert ChannelOptions().tick_ms == 0 and Config().channel_options("x").tick_ms == 0
