"""The browser client (/client.js) in headless Chromium against real relay servers.

WebSocket first; then the fallback chain through a proxy that refuses WebSocket upgrades
(and /sse): Server-Sent Events with HTTP publishes, long-polling, and back up to WebSocket
once the proxy lets them through; a server restart (a real ``relay serve`` process) with the
offline publish queue; token expiry; the status indicator.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import jwt
import trio

from relay.config import AuthConfig
from server.conftest import open_client

from .conftest import (
    APP_ORIGIN,
    Chromium,
    Page,
    free_port,
    gate_proxy,
    http_publish,
    open_page,
    relay_process,
    running_server,
)

SECRET = "a-browser-test-secret-of-32-bytes-at-least"
API_KEY = "browser-test-api-key-0123"
FAST = "minBackoff: 50, maxBackoff: 300"


def transports(events: list[Any]) -> list[str]:
    return [detail for kind, detail, *_ in events if kind == "transport"]


async def publish_steadily(port: int, channel: str, count: int, sent: list[int], pause: float = 0.03) -> None:
    """Publish 0..count-1 from a backend, one every ``pause`` seconds."""
    for n in range(count):
        await http_publish(port, channel, n)
        sent.append(n)
        await trio.sleep(pause)


async def assert_exactly(page: Page, channel: str, sent: list[int]) -> None:
    """The page received every value in ``sent``, once each and in order, with growing offsets."""
    await page.wait(f"received[{channel!r}].length >= {len(sent)}")
    await trio.sleep(0.2)  # (anything more would be a duplicate)
    got = await page.received(channel)
    assert [data for _, data in got] == sent
    offsets = [offset for offset, _ in got]
    assert offsets == sorted(set(offsets))


async def test_subscribe_publish_unsubscribe_over_websocket(chromium: Chromium) -> None:
    with trio.fail_after(30):
        async with running_server() as server, open_page(chromium, f"{server.http_url}/client.js") as page:
            await page.eval("([url]) => start(url, {})", [server.url])
            await page.wait("relay.status === 'connected'")
            assert await page.text("#status") == "connected" and await page.text("#transport") == "websocket"
            await page.eval("window.s = sub('chat.42'); sub('chat.other'); 0")
            await page.eval("s.ready.then(() => 0)")
            acks = await page.eval("Promise.all([pub('chat.42', {text: 'hi'}), pub('chat.42', {text: 'there'})])")
            assert [a["offset"] for a in acks] == [1, 2] and acks[0]["channel"] == "chat.42"
            await http_publish(server.port, "chat.42", {"text": "from a backend"})
            await page.wait("received['chat.42'].length === 3")
            assert await page.received("chat.42") == [
                (1, {"text": "hi"}), (2, {"text": "there"}), (3, {"text": "from a backend"})]
            assert await page.eval("s.position") == f"{acks[0]['epoch']}:3"
            # bad input is refused with a clear error before anything is sent
            error = await page.eval("pub('chat.42', {n: NaN}).then(() => null, (e) => [e.name, e.message])")
            assert error[0] == "InvalidData" and "NaN" in error[1]
            error = await page.eval("(() => { try { relay.subscribe('chat.42', () => {}); } catch (e) { return e.message; } })()")
            assert "already subscribed" in error
            error = await page.eval("(() => { try { new relayModule.Relay('ws://x/ws', {encoding: 'msgpack'}); }"
                                    " catch (e) { return e.message; } })()")
            assert 'use "json"' in error
            # after unsubscribe nothing more arrives on that channel (the other one still does)
            await page.eval("s.unsubscribe()")
            await http_publish(server.port, "chat.42", "after unsubscribe")
            await http_publish(server.port, "chat.other", "sentinel")
            await page.wait("received['chat.other'].length === 1")
            assert len(await page.received("chat.42")) == 3
            await page.eval("relay.close()")
            await page.wait("relay.status === 'closed'")
            error = await page.eval("pub('chat.42', 1).then(() => null, (e) => e.name)")
    assert error == "ClientClosed"


async def test_server_restart_loses_nothing_and_sends_the_offline_queue(chromium: Chromium, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "relay.toml"
    config.write_text(f'[auth]\nallowed_origins = ["{APP_ORIGIN}"]\n')
    with trio.fail_after(45):
        async with relay_process(port, str(config)) as first:
            async with open_page(chromium, f"http://127.0.0.1:{port}/client.js") as page:
                await page.eval(f"([url]) => start(url, {{{FAST}, maxOfflineQueue: 2}})", [f"ws://127.0.0.1:{port}/ws"])
                await page.eval("sub('chat.r').ready.then(() => 0)")
                await http_publish(port, "chat.r", 1)
                await http_publish(port, "chat.r", 2)
                await page.wait("received['chat.r'].length === 2")
                first.send_signal(signal.SIGKILL)
                await first.wait()
                await page.wait("relay.status === 'reconnecting'")
                assert await page.text("#status") == "reconnecting"
                # publishes made while the server is down wait in the bounded queue
                await page.eval("window.queued = [pub('chat.r', 'q1'), pub('chat.r', 'q2')]; 0")
                full = await page.eval("pub('chat.r', 'q3').then(() => null, (e) => [e.name, e.message])")
                assert full[0] == "OfflineQueueFull" and "maxOfflineQueue=2" in full[1]
                async with relay_process(port, str(config)):
                    await page.wait("relay.status === 'connected'")
                    acks = await page.eval("Promise.all(queued)")
                    await http_publish(port, "chat.r", 3)
                    await page.wait("received['chat.r'].length === 5")
                    received = await page.received("chat.r")
                    lost = await page.eval("lost")
                    statuses = [d for k, d, *_ in await page.eval("events") if k == "status"]
    assert [data for _, data in received] == [1, 2, "q1", "q2", 3]
    assert [a["offset"] for a in acks] == [1, 2]  # the new server's epoch starts over
    # a restart of a single node loses its history: the client says so instead of pretending
    assert len(lost) == 1 and lost[0]["kind"] == "recovery" and lost[0]["oldOffset"] == 2
    assert statuses[:2] == ["connected", "reconnecting"] and statuses[-1] == "connected"


async def test_falls_back_to_sse_and_moves_back_up_to_websocket(chromium: Chromium) -> None:
    with trio.fail_after(40):
        async with running_server() as server, gate_proxy(server.port) as proxy, \
                open_page(chromium, f"{server.http_url}/client.js") as page:
            proxy.block_websocket = True
            await page.eval(f"([url]) => start(url, {{{FAST}, probeInterval: 500}})", [proxy.url])
            await page.eval("sub('chat.f'); 0")
            await page.wait("relay.transport === 'sse' && relay.status === 'connected'")
            assert await page.text("#transport") == "sse"
            assert proxy.refused.count("/ws") >= 2  # fallbackAfter: 2 refused upgrades first
            ack = await page.eval("pub('chat.f', 'over http')")
            assert ack["offset"] == 1
            sent = ["over http"]
            await page.wait("received['chat.f'].length === 1")
            async with trio.open_nursery() as nursery:
                more: list[int] = []
                nursery.start_soon(publish_steadily, server.port, "chat.f", 40, more)
                await trio.sleep(0.3)
                proxy.block_websocket = False  # the client's probe finds the way back up
                await page.wait("relay.transport === 'websocket'")
            sent += more
            await assert_exactly(page, "chat.f", sent)
            ack = await page.eval("pub('chat.f', 'over websocket')")
            assert ack["offset"] == len(sent) + 1
            assert transports(await page.eval("events")) == ["sse", "websocket"]
            assert any(path.startswith("/sse") for path in proxy.passed)
            assert any(path.startswith("/publish") for path in proxy.passed)


async def test_falls_back_to_long_polling_and_moves_up_step_by_step(chromium: Chromium) -> None:
    with trio.fail_after(45):
        async with running_server() as server, gate_proxy(server.port) as proxy, \
                open_page(chromium, f"{server.http_url}/client.js") as page:
            proxy.block_websocket = proxy.block_sse = True
            await page.eval(f"([url]) => start(url, {{{FAST}, probeInterval: 500, fallbackAfter: 1}})", [proxy.url])
            await page.eval("sub('chat.p'); 0")
            await page.wait("relay.transport === 'poll' && relay.status === 'connected'")
            assert await page.text("#transport") == "poll"
            assert "/ws" in proxy.refused and any(p.startswith("/sse") for p in proxy.refused)
            await page.eval("sub('chat.q').ready.then(() => 0)")  # a second channel while polling
            assert (await page.eval("pub('chat.q', 'to q')"))["offset"] == 1
            await page.wait("received['chat.q'].length === 1")
            sent: list[int] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(publish_steadily, server.port, "chat.p", 60, sent)
                await trio.sleep(0.4)
                proxy.block_sse = False
                await page.wait("relay.transport === 'sse'")
                await trio.sleep(0.3)
                proxy.block_websocket = False
                await page.wait("relay.transport === 'websocket'")
            await assert_exactly(page, "chat.p", sent)
            assert transports(await page.eval("events")) == ["poll", "sse", "websocket"]


async def test_status_indicator_goes_offline_and_back(chromium: Chromium) -> None:
    with trio.fail_after(30):
        async with running_server() as server, open_page(chromium, f"{server.http_url}/client.js") as page:
            await page.eval(f"([url]) => start(url, {{{FAST}}})", [server.url])
            await page.eval("sub('chat.o').ready.then(() => 0)")
            assert await page.text("#status") == "connected"
            await page.set_offline(True)
            await page.wait("relay.status === 'offline'")
            assert await page.text("#status") == "offline"
            await page.eval("window.later = pub('chat.o', 'sent while offline'); 0")
            await trio.sleep(0.3)
            assert await page.eval("relay.status") == "offline"
            await page.set_offline(False)
            await page.wait("relay.status === 'connected'")
            ack = await page.eval("later")
            await page.wait("received['chat.o'].length === 1")
            statuses = [d for k, d, *_ in await page.eval("events") if k == "status"]
    assert ack["offset"] == 1 and "offline" in statuses and statuses[-1] == "connected"


async def test_token_expiry_gets_a_new_token_and_recovers(chromium: Chromium) -> None:
    def token(seconds: float) -> str:
        return jwt.encode({"sub": "ann", "exp": int(time.time() + seconds)}, SECRET, algorithm="HS256")

    auth = AuthConfig(jwt_secret=SECRET, api_keys=(API_KEY,), allowed_origins=(APP_ORIGIN,))
    with trio.fail_after(30):
        async with running_server(auth=auth) as server, open_page(chromium, f"{server.http_url}/client.js") as page:
            await page.eval("([token]) => { window.nextToken = token; }", [token(60)])
            await page.eval(f"([url, token]) => start(url, {{{FAST}, token, tokenCallback: async () => nextToken}})",
                            [server.url, token(2)])
            await page.eval("sub('chat.t').ready.then(() => 0)")
            await http_publish(server.port, "chat.t", 1, API_KEY)
            await page.wait("events.some(([k, d]) => k === 'disconnected' && d.code === 4001)")
            await http_publish(server.port, "chat.t", 2, API_KEY)  # while the client gets its new token
            await page.wait("received['chat.t'].length === 2 && relay.status === 'connected'")
            received = await page.received("chat.t")
            lost = await page.eval("lost")
    assert [data for _, data in received] == [1, 2] and lost == []


async def test_channel_permissions_are_the_same_on_every_transport(chromium: Chromium) -> None:
    tok = jwt.encode({"sub": "ann", "exp": int(time.time() + 60), "channels": ["chat.*"], "publish": ["chat.mine"]},
                     SECRET, algorithm="HS256")
    auth = AuthConfig(jwt_secret=SECRET, api_keys=(API_KEY,), allowed_origins=(APP_ORIGIN,))
    with trio.fail_after(40):
        async with running_server(auth=auth) as server, gate_proxy(server.port) as proxy:
            for blocked in (False, True):
                proxy.block_websocket = blocked
                async with open_page(chromium, f"{server.http_url}/client.js") as page:
                    await page.eval(f"([url, token]) => start(url, {{{FAST}, token}})", [proxy.url, tok])
                    await page.eval("window.ok = sub('chat.mine'); window.bad = sub('secret'); 0")
                    refusal = await page.eval("bad.ready.then(() => null, (e) => [e.name, e.code, e.channel])")
                    assert refusal == ["RequestFailed", "forbidden", "secret"]
                    await page.eval("ok.ready.then(() => 0)")
                    assert await page.eval("relay.transport") == ("sse" if blocked else "websocket")
                    failed = await page.eval("pub('chat.other', 1).then(() => null, (e) => [e.name, e.code])")
                    assert failed == ["RequestFailed", "forbidden"]
                    ack = await page.eval("pub('chat.mine', 'mine')")
                    await http_publish(server.port, "chat.mine", "backend", API_KEY)
                    await page.wait(f"received['chat.mine'].length === 2")
                    assert [d for _, d in await page.received("chat.mine")][-2:] == ["mine", "backend"]
                    assert ack["channel"] == "chat.mine"


async def test_drain_hint_is_followed_and_publishes_wait_for_the_next_server(chromium: Chromium) -> None:
    """1001 with reconnect_after_ms: the client waits that long (not its backoff), then recovers
    on the next server; a publish made meanwhile is queued, not lost."""
    port = free_port()
    with trio.fail_after(40):
        async with running_server(port=port, drain_window=2.0, drain_timeout=5) as first:
            async with open_page(chromium, f"{first.http_url}/client.js") as page:
                await page.eval("([url]) => start(url, {minBackoff: 200, maxBackoff: 200})", [first.url])
                await page.eval("sub('chat.d').ready.then(() => 0)")
                await http_publish(port, "chat.d", "before")
                await page.wait("received['chat.d'].length === 1")
                await first.drain()
                await page.wait("events.some(([k]) => k === 'reconnecting')")
                await page.eval("window.queued = pub('chat.d', 'queued'); 0")
                async with running_server(port=port):
                    await page.wait("relay.status === 'connected'", timeout_ms=5000)
                    ack = await page.eval("queued")
                    await page.wait("received['chat.d'].length === 2")
                    events = await page.eval("events")
                    received = [d for _, d in await page.received("chat.d")]
    closes = [d for k, d, *_ in events if k == "disconnected"]
    assert closes[0]["code"] == 1001 and "reconnect_after_ms" in closes[0]["reason"]
    hint = json.loads(closes[0]["reason"])["reconnect_after_ms"]
    delay = next(d for k, d, *_ in events if k == "reconnecting")["delay"]
    assert hint <= delay <= hint + 200 and hint <= 2000  # the server's hint plus jitter under minBackoff
    assert received == ["before", "queued"] and ack["offset"] == 1


async def test_refresh_replaces_the_token_without_reconnecting(chromium: Chromium) -> None:
    def token(seconds: float) -> str:
        return jwt.encode({"sub": "ann", "exp": int(time.time() + seconds)}, SECRET, algorithm="HS256")

    auth = AuthConfig(jwt_secret=SECRET, allowed_origins=(APP_ORIGIN,))
    with trio.fail_after(30):
        async with running_server(auth=auth) as server, open_page(chromium, f"{server.http_url}/client.js") as page:
            await page.eval("([url, token]) => start(url, {token})", [server.url, token(2)])
            await page.wait("relay.status === 'connected'")
            expires = await page.eval("([token]) => relay.refresh(token)", [token(60)])
            assert time.time() + 50 < expires < time.time() + 70
            refused = await page.eval("relay.refresh('not.a.token').then(() => null, (e) => [e.name, e.code])")
            assert refused == ["RequestFailed", "unauthorized"]
            await trio.sleep(2.5)  # past the first token's expiry
            assert await page.eval("relay.status") == "connected"
            assert not [d for k, d, *_ in await page.eval("events") if k == "disconnected"]


async def test_restart_with_redis_behind_loses_nothing(chromium: Chromium, tmp_path: Path) -> None:
    """Two relay nodes on one Redis: the page's node is killed (SIGKILL) while the other keeps
    publishing; the restarted node recovers the missed messages from Redis for the page, which
    sees every message once, in order, with recovered: true and no loss reported."""
    redis = shutil.which("redis-server")
    assert redis is not None, "redis-server is not installed (apt-get install redis-server)"
    redis_port, port_a, port_b = free_port(), free_port(), free_port()
    config = tmp_path / "relay.toml"
    config.write_text(f'redis_url = "redis://127.0.0.1:{redis_port}/0"\n'
                      f'[auth]\nallowed_origins = ["{APP_ORIGIN}"]\n')
    with trio.fail_after(45):
        redis_proc = await trio.lowlevel.open_process(
            [redis, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(tmp_path)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            async with relay_process(port_b, str(config)):
                async with relay_process(port_a, str(config)) as node_a:
                    async with open_page(chromium, f"http://127.0.0.1:{port_a}/client.js") as page:
                        await page.eval(f"([url]) => start(url, {{{FAST}}})", [f"ws://127.0.0.1:{port_a}/ws"])
                        await page.eval("sub('chat.x').ready.then(() => 0)")
                        for n in (1, 2):  # published on the other node
                            await http_publish(port_b, "chat.x", n)
                        await page.wait("received['chat.x'].length === 2")
                        node_a.send_signal(signal.SIGKILL)
                        await node_a.wait()
                        for n in (3, 4):  # while the page's node is down
                            await http_publish(port_b, "chat.x", n)
                        await page.wait("relay.status === 'reconnecting'")
                        await page.eval("window.queued = pub('chat.x', 'queued'); 0")
                        async with relay_process(port_a, str(config)):
                            await page.wait("relay.status === 'connected'")
                            ack = await page.eval("queued")
                            await http_publish(port_b, "chat.x", 5)
                            await page.wait("received['chat.x'].length === 6")
                            await trio.sleep(0.2)
                            received = await page.received("chat.x")
                            lost = await page.eval("lost")
                            subscribed = [d for k, d, *_ in await page.eval("events") if k == "subscribed"]
        finally:
            redis_proc.kill()
            with trio.CancelScope(shield=True):
                await redis_proc.wait()
    assert received == [(1, 1), (2, 2), (3, 3), (4, 4), (5, "queued"), (6, 5)]
    assert ack["offset"] == 5 and lost == []
    assert subscribed[-1]["recovered"] is True and subscribed[-1]["epoch"] == subscribed[0]["epoch"]


async def test_ticks_and_publish_stamps_in_the_browser(chromium: Chromium) -> None:
    """With ``tickMs`` the page asks for ticks (``?tick_ms=``) and unpacks the array frames;
    every message carries the server's publish stamp (ms) and its end-to-end latency."""
    with trio.fail_after(30):
        async with running_server() as server, open_page(chromium, f"{server.http_url}/client.js") as page:
            error = await page.eval(
                "([url]) => { try { new relayModule.Relay(url, {tickMs: 5}); return null; } catch (e) { return [e.name, e.message]; } }",
                [server.url])
            assert error is not None and error[0] == "RangeError" and "tickMs" in error[1]
            await page.eval("([url]) => start(url, {tickMs: 50})", [server.url])
            await page.wait("relay.status === 'connected'")
            assert [c.tick_ms for c in server.connections.values()] == [50]
            await page.eval("""() => { window.got = [];
                window.t = relay.subscribe('tick.feed', (m) => window.got.push([m.offset, m.data, m.ts, m.received, m.latency]));
                return window.t.ready.then(() => 0); }""")
            before_ms = time.time() * 1000
            for n in range(20):
                await http_publish(server.port, "tick.feed", n)
            await page.wait("got.length === 20")
            after_ms = time.time() * 1000
            got = await page.eval("got")
            assert [(offset, data) for offset, data, *_ in got] == [(n + 1, n) for n in range(20)]
            stamps = [ts for _, _, ts, _, _ in got]
            assert stamps == sorted(stamps) and before_ms - 1 <= stamps[0] and stamps[-1] <= after_ms + 1
            for _, _, ts, received, latency in got:
                assert abs(latency - (received - ts)) < 1e-6 and -5 < latency < after_ms - before_ms + 5
            summary = await page.eval("t.latency()")
            assert summary["count"] == 20 and summary["p50"] <= summary["p99"] <= summary["max"]


async def test_presence_and_join_leave_events(chromium: Chromium) -> None:
    channels = [{"pattern": "lobby.*", "presence": True, "join_leave": True}]
    with trio.fail_after(30):
        async with running_server(channels=channels) as server, \
                open_page(chromium, f"{server.http_url}/client.js") as page:
            await page.eval("([url]) => start(url, {})", [server.url])
            await page.wait("relay.status === 'connected'")
            await page.eval("window.s = sub('lobby.1'); s.ready.then(() => 0)")
            members = await page.eval("relay.presence('lobby.1')")
            assert [m["conn"] for m in members] == [await page.eval("relay.session")]
            assert await page.eval("relay.presenceStats('lobby.1')") == {"connections": 1, "users": 1}
            error = await page.eval("relay.presence('chat.1').then(() => null, (e) => [e.name, e.code])")
            assert error == ["RequestFailed", "bad_request"]
            async with open_client(server) as other:
                await other.subscribe("lobby.1")
            await page.wait("events.filter(([t]) => t === 'leave').length === 1")
            got = [(kind, detail["channel"], detail["member"]["conn"]) for kind, detail, *_ in
                   await page.eval("events") if kind in ("join", "leave")]
            me = members[0]["conn"]
            assert got == [("join", "lobby.1", me), ("join", "lobby.1", other.welcome["session"]),
                           ("leave", "lobby.1", other.welcome["session"])]


async def test_a_ticked_channel_inside_a_ticked_connection_in_the_browser(chromium: Chromium) -> None:
    """A channel with ``tick_ms`` sends arrays; on a connection with ``tickMs`` they arrive
    inside the connection's arrays: the page gets every message once, in order."""
    channels = [{"pattern": "tick.*", "tick_ms": 30}]
    with trio.fail_after(30):
        async with running_server(channels=channels) as server, \
                open_page(chromium, f"{server.http_url}/client.js") as page:
            await page.eval("([url]) => start(url, {tickMs: 20})", [server.url])
            await page.wait("relay.status === 'connected'")
            await page.eval("window.s = sub('tick.both'); s.ready.then(() => 0)")
            for n in range(12):
                await http_publish(server.port, "tick.both", n)
            await page.wait("received['tick.both'].length >= 12")
            await trio.sleep(0.1)
            assert await page.received("tick.both") == [(n + 1, n) for n in range(12)]
