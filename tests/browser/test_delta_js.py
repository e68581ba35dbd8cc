"""The browser client on delta channels (headless Chromium, real server): it asks for
deltas, applies the merge patches and hands onMessage full values; behind a conflating
queue it ends on the newest value; after a missed patch it fetches the full value."""

from __future__ import annotations

import json
from typing import Any

import trio

from relay.core import mergepatch

from .conftest import Chromium, open_page, running_server

DELTA = {"pattern": "game.*", "mode": "state", "delta": True}


def _world(tick: int) -> dict[str, Any]:
    return {"tick": tick, "units": {f"u{i}": {"x": i + (tick if i == tick % 25 else 0), "name": f"ü{i}"}
                                    for i in range(25)}, "gone": None if tick % 7 == 0 else 1}


def _big(i: int) -> dict[str, Any]:
    return {"n": i, "blob": f"{i:06d}" * 1000, "static": "s" * 3000}


async def test_patches_are_applied_transparently(chromium: Chromium) -> None:
    with trio.fail_after(30):
        async with running_server(channels=[DELTA]) as server, \
                open_page(chromium, f"{server.http_url}/client.js") as page:
            # the merge patch itself, on RFC 7386's examples
            cases = [({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}), ([1, 2], {"a": "b", "c": None}),
                     ({"a": "foo"}, None), ({}, {"a": {"bb": {"ccc": None}}}), ({"x": 1}, {"__proto__": {"y": 2}})]
            for target, patch in cases:
                got = await page.eval("([t, p]) => JSON.stringify(relayModule.applyMergePatch(JSON.parse(t), JSON.parse(p)))",
                                      [json.dumps(target), json.dumps(patch)])
                assert json.loads(got) == mergepatch.apply(target, patch), (target, patch)
            await page.eval("([url]) => start(url, {})", [server.url])
            await page.wait("relay.status === 'connected'")
            server.hub.publish("game.1", _world(0), trio.current_time())
            await page.eval("window.s = relay.subscribe('game.1', (m) => { received.push([m.offset, JSON.parse(JSON.stringify(m.data))]);"
                            " m.data.units = null; }); window.received = []; s.ready.then(() => 0)")
            await page.wait("received.length === 1")
            assert await page.eval("s._delta") is True
            for i in range(1, 31):
                server.hub.publish("game.1", _world(i), trio.current_time())
                await trio.sleep(0.005)
            await page.wait("received.length === 31")
            received = await page.eval("received")
            assert received == [[i + 1, _world(i)] for i in range(31)]
            assert await page.eval("s.resyncs") == 0


async def test_behind_a_conflating_queue_and_after_a_missed_patch(chromium: Chromium) -> None:
    with trio.fail_after(30):
        async with running_server(channels=[DELTA, {**DELTA, "pattern": "drop.*", "slow_consumer": "drop"}],
                                  send_queue_size=32 * 1024, max_message_size=16 * 1024) as server, \
                open_page(chromium, f"{server.http_url}/client.js") as page:
            await page.eval("([url]) => start(url, {})", [server.url])
            await page.wait("relay.status === 'connected'")
            await page.eval("window.s = sub('game.big'); window.d = sub('drop.big');"
                            " Promise.all([s.ready, d.ready]).then(() => 0)")
            now = trio.current_time()
            for i in range(1, 61):  # one scheduling pass: the send queue overflows
                server.hub.publish("game.big", _big(i), now)
                server.hub.publish("drop.big", _big(i), now)
            await page.wait("received['game.big'].length > 0 && received['game.big'].at(-1)[0] === 60")
            await trio.sleep(0.2)
            for i in range(61, 64):  # after the gap, the drop channel's patch has no base
                server.hub.publish("drop.big", _big(i), trio.current_time())
                await trio.sleep(0.02)
            await page.wait("received['drop.big'].length > 0 && received['drop.big'].at(-1)[0] === 63")
            for channel in ("game.big", "drop.big"):
                got = await page.eval(f"received[{json.dumps(channel)}]")
                offsets = [o for o, _ in got]
                assert offsets == sorted(set(offsets))
                for offset, data in got:
                    assert data == _big(offset), (channel, offset)  # never a wrong value
            assert len(await page.eval("received['game.big']")) < 60  # conflated
            assert await page.eval("s.resyncs") == 0  # the server kept the full value
            assert await page.eval("d.resyncs") >= 1  # the client fetched it
