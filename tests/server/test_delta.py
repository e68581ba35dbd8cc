"""State deltas (channel option ``delta = true``) on the wire, through a real server: a
subscriber that asks for deltas gets the full value, then merge patches with their base;
one that does not ask keeps getting full values; both end with the same value."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from relay.core import mergepatch

from .conftest import Client, open_client, running_server

DELTA = [{"pattern": "game.*", "mode": "state", "delta": True}]


def _world(tick: int) -> dict[str, Any]:
    """A game state of 20 entities of which one or two move per tick."""
    return {"tick": tick, "entities": {
        f"e{i}": {"x": i * 10 + (tick if i == tick % 20 else 0), "y": i, "hp": 100, "name": f"unit-{i}"}
        for i in range(20)}}


VALUES: list[Any] = [
    _world(0), _world(1), _world(2),
    {**_world(3), "flag": None},  # a null member: no patch can write it, the full value goes
    _world(4), _world(5),
    {**_world(6), "list": [1, None, {"a": None}]},  # arrays go whole (nulls inside are fine)
    _world(7), "a string", _world(8),
]


class _Follower:
    """A wire-level client that applies patches like relay's clients do, and checks bases."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.value: Any = None
        self.offset: int | None = None
        self.patches = 0
        self.fulls = 0

    def take(self, msg: dict[str, Any]) -> None:
        assert msg["type"] == "message", msg
        if msg.get("delta"):
            assert msg["base"] == self.offset == msg["offset"] - 1, (msg["base"], self.offset)
            self.value = mergepatch.apply(self.value, msg["data"])
            self.patches += 1
        else:
            assert "base" not in msg
            self.value = msg["data"]
            self.fulls += 1
        self.offset = msg["offset"]


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_delta_and_full_subscribers_end_with_the_same_value(encoding: str) -> None:
    channel = "game.1"
    with trio.fail_after(15):
        async with running_server(channels=DELTA) as server:
            async with open_client(server, encoding) as dsub, open_client(server, encoding) as fsub, \
                    open_client(server, encoding) as other, open_client(server) as pub:
                await pub.publish(channel, VALUES[0])
                answer = await dsub.subscribe(channel, delta=True)
                assert answer["delta"] is True and answer["offset"] == 1
                assert "delta" not in await fsub.subscribe(channel)  # did not ask
                assert "delta" not in await other.subscribe(channel, delta=False)
                follower = _Follower(dsub)
                follower.take(await dsub.recv())  # the current value, in full
                assert follower.value == VALUES[0]
                for f in (fsub, other):
                    assert (await f.recv())["data"] == VALUES[0]
                for i, value in enumerate(VALUES[1:], start=2):
                    await pub.publish(channel, value, ref=i)
                    msg = await dsub.recv()
                    follower.take(msg)
                    assert follower.value == value, i
                    for f in (fsub, other):
                        full = await f.recv()
                        assert full["offset"] == i and full["data"] == value and "delta" not in full
                # The patch is used where it is smaller; nulls in objects and the string go in full.
                assert follower.patches >= 6
                assert follower.fulls >= 3  # the first value, the null member, the string


async def test_patch_frames_are_smaller_and_nothing_changed_is_an_empty_patch() -> None:
    channel = "game.2"
    with trio.fail_after(10):
        async with running_server(channels=DELTA) as server:
            async with open_client(server) as dsub, open_client(server) as pub:
                await dsub.subscribe(channel, delta=True)
                await pub.publish(channel, _world(1))
                first = await dsub.recv()
                assert "delta" not in first
                await pub.publish(channel, _world(1))  # the same value again
                same = await dsub.recv()
                assert same["delta"] is True and same["data"] == {} and same["base"] == 1
                await pub.publish(channel, _world(2))
                moved = await dsub.recv()
                assert moved["delta"] is True
                assert moved["data"] == {"tick": 2, "entities": {"e1": {"x": 10}, "e2": {"x": 22}}}


async def test_recovery_with_since_sends_the_full_value_then_patches() -> None:
    channel = "game.3"
    with trio.fail_after(10):
        async with running_server(channels=DELTA) as server:
            async with open_client(server) as pub:
                for i in range(1, 4):
                    ack = await pub.publish(channel, _world(i))
                async with open_client(server) as dsub:
                    answer = await dsub.subscribe(channel, delta=True,
                                                  since={"epoch": ack["epoch"], "offset": 1})
                    assert answer["recovered"] is True and answer["delta"] is True
                    follower = _Follower(dsub)
                    follower.take(await dsub.recv())
                    assert follower.offset == 3 and follower.value == _world(3) and follower.fulls == 1
                    await pub.publish(channel, _world(4))
                    follower.take(await dsub.recv())
                    assert follower.patches == 1 and follower.value == _world(4)
                    # A resubscription (what a client does when it misses a patch) gets the
                    # full value again.
                    await dsub.request({"type": "unsubscribe", "channel": channel})
                    await dsub.subscribe(channel, delta=True,
                                         since={"epoch": ack["epoch"], "offset": 3})
                    follower.take(await dsub.recv())
                    assert follower.fulls == 2 and follower.offset == 4


async def test_channels_without_delta_ignore_the_request_and_bad_flags_are_refused() -> None:
    with trio.fail_after(10):
        async with running_server(channels=DELTA + [{"pattern": "plain.*", "mode": "state"}]) as server:
            async with open_client(server) as sub, open_client(server) as pub:
                assert "delta" not in await sub.subscribe("plain.1", delta=True)
                await pub.publish("plain.1", _world(1))
                await pub.publish("plain.1", _world(2))
                assert "delta" not in await sub.recv()
                assert (await sub.recv())["data"] == _world(2)
                bad = await sub.request({"type": "subscribe", "channel": "game.9", "delta": 1, "ref": 5})
                assert bad["type"] == "error" and bad["code"] == "bad_request" and bad["ref"] == 5


async def test_ticked_connections_get_patches_and_full_values_when_a_tick_conflates() -> None:
    # A tick keeps only the newest frame of a state channel: when a tick holds more than
    # one update, the one that stays is the full value (the patches in between are gone).
    with trio.fail_after(10):
        async with running_server(channels=DELTA) as server:
            async with open_client(server, uri_path="/ws?tick_ms=20") as sub:
                await sub.send({"type": "subscribe", "channel": "game.4", "delta": True, "ref": 1})
                [answer] = await sub.recv()
                assert answer["type"] == "subscribed" and answer["delta"] is True
                follower = _Follower(sub)
                now = trio.current_time()
                server.hub.publish("game.4", _world(1), now)
                [msg] = await sub.recv()
                follower.take(msg)
                server.hub.publish("game.4", _world(2), trio.current_time())
                [msg] = await sub.recv()  # one update in the tick: a patch
                follower.take(msg)
                assert msg["delta"] is True and follower.value == _world(2)
                for i in range(3, 6):  # three in one tick: the newest, in full
                    server.hub.publish("game.4", _world(i), trio.current_time())
                [msg] = await sub.recv()
                follower.take(msg)
                assert "delta" not in msg and follower.value == _world(5)
                server.hub.publish("game.4", _world(6), trio.current_time())
                [msg] = await sub.recv()
                follower.take(msg)
                assert msg["delta"] is True and follower.value == _world(6)


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_a_subscriber_behind_never_gets_a_patch_without_its_base(encoding: str) -> None:
    # Published in one scheduling pass, the updates overflow the send queue: what the
    # conflation keeps for the delta subscriber is the full value, never a lone patch.
    static = "s" * 3000
    values = {i: {"n": i, "blob": f"{i:06d}" * 1000, "static": static} for i in range(1, 41)}
    with trio.fail_after(10):
        async with running_server(channels=DELTA, send_queue_size=32 * 1024,
                                  max_message_size=16 * 1024) as server:
            async with open_client(server, encoding) as dsub, open_client(server, encoding) as fsub:
                await dsub.subscribe("game.5", delta=True)
                await fsub.subscribe("game.5")
                for rnd in range(2):
                    now = trio.current_time()
                    for i in range(1 + 20 * rnd, 21 + 20 * rnd):
                        server.hub.publish("game.5", values[i], now)
                    follower = _Follower(dsub) if rnd == 0 else follower
                    while follower.offset != 20 + 20 * rnd:
                        follower.take(await dsub.recv())  # checks every patch's base
                        assert follower.value == values[follower.offset]
                    last = None
                    while last is None or last["offset"] != 20 + 20 * rnd:
                        last = await fsub.recv()
                    assert last["data"] == follower.value
                assert follower.patches >= 2 and follower.fulls >= 2
                assert follower.fulls + follower.patches < 40  # some were conflated
