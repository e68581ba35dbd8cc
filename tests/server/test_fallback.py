"""GET /sse, GET /poll, POST /publish and GET /client.js, from a plain HTTP client over loopback.

The client here is h11 over a trio socket: it reads the event stream as a browser's
EventSource would (``id``, ``event``, ``data`` fields), so the tests see exactly the bytes
on the wire. The server is a real in-process RelayServer.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import pytest
import trio

from relay.config import AuthConfig, LimitsConfig
from relay.server.app import RelayServer
from relay.core.auth import ANONYMOUS
from relay.core.envelope import Since
from relay.server import fallback
from relay.server.fallback import parse_position

from .conftest import http_request, open_client, pop_ts, running_server
from .test_auth import SECRET, token


class EventStream:
    """One ``GET /sse`` response, parsed into events as they arrive."""

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        self.stream = stream
        self.conn = conn
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self._buffer = b""
        self._ended = False
        #: The id of the last event that had one (what EventSource would send as Last-Event-ID).
        self.last_id: str | None = None

    async def _more(self) -> bool:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(65536)
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                self.status = event.status_code
                self.headers = {k.decode(): v.decode() for k, v in event.headers}
                continue
            if isinstance(event, h11.Data):
                self._buffer += event.data
                return True
            self._ended = True
            return False

    async def start(self) -> None:
        while not self.status:
            if not await self._more():
                break

    async def next(self) -> dict[str, Any] | None:
        """Return the next event (``comment`` events for ``:`` lines), or None at the end."""
        while b"\n\n" not in self._buffer:
            if self._ended or not await self._more():
                return None
        block, self._buffer = self._buffer.split(b"\n\n", 1)
        event: dict[str, Any] = {}
        for line in block.decode().split("\n"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "":
                event["comment"] = value
            elif name == "data":
                event["data"] = json.loads(value)
            else:
                event[name] = value
        if "id" in event:
            self.last_id = event["id"]
        return event

    async def next_of(self, *kinds: str) -> dict[str, Any]:
        """Skip comments, ``retry`` and ``welcome``; return the next event, checking its kind."""
        while True:
            event = await self.next()
            assert event is not None, "the stream ended"
            if "event" not in event or event["event"] == "welcome":
                continue
            if kinds:
                assert event["event"] in kinds, event
            return event

    async def read_error(self) -> dict[str, Any]:
        while await self._more():
            pass
        return json.loads(self._buffer)


@asynccontextmanager
async def sse(server: RelayServer, query: str, headers: dict[str, str] | None = None) -> AsyncIterator[EventStream]:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        hdrs = [("Host", f"127.0.0.1:{server.port}"), ("Accept", "text/event-stream")]
        hdrs += list((headers or {}).items())
        await stream.send_all(conn.send(h11.Request(method="GET", target=f"/sse?{query}", headers=hdrs))
                              + conn.send(h11.EndOfMessage()))
        events = EventStream(stream, conn)
        await events.start()
        yield events


async def poll(server: RelayServer, query: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, body, _ = await http_request(server, "GET", f"/poll?{query}", headers=headers)
    return status, json.loads(body)


async def publish(server: RelayServer, channel: str, data: Any, headers: dict[str, str] | None = None,
                  path: str = "/publish") -> tuple[int, Any]:
    status, body, _ = await http_request(
        server, "POST", path, json.dumps({"channel": channel, "data": data}).encode(), headers)
    return status, json.loads(body)


def messages(events: list[dict[str, Any]]) -> list[tuple[str, int, Any]]:
    return [(e["channel"], e["offset"], e["data"]) for e in events if e["type"] == "message"]


@asynccontextmanager
async def auth_server(**overrides: Any) -> AsyncIterator[RelayServer]:
    auth = overrides.pop("auth", {})
    auth.setdefault("jwt_secret", SECRET)
    async with running_server(auth=AuthConfig(**auth), **overrides) as server:
        yield server


# --------------------------------------------------------------------------- SSE


async def test_sse_streams_subscribed_then_live_messages_with_position_ids() -> None:
    with trio.fail_after(10):
        async with running_server() as server, sse(server, "channel=a&channel=b") as events:
            assert events.status == 200
            assert events.headers["content-type"].startswith("text/event-stream")
            first = await events.next()
            assert first == {"retry": "2000"}
            welcome = await events.next()
            assert welcome is not None and welcome["event"] == "welcome"
            assert welcome["data"]["node"] == "test" and welcome["data"]["session"] in server.connections
            sub_a = await events.next_of("subscribed")
            sub_b = await events.next_of("subscribed")
            assert (sub_a["data"]["channel"], sub_b["data"]["channel"]) == ("a", "b")
            epoch_a, epoch_b = sub_a["data"]["epoch"], sub_b["data"]["epoch"]
            assert sub_a["id"] == f"{epoch_a}:0,"  # b's position is not known yet
            assert sub_b["id"] == f"{epoch_a}:0,{epoch_b}:0"
            # from a WebSocket client and over HTTP: the same fan-out
            async with open_client(server) as ws:
                await ws.publish("b", {"n": 1})
            assert (await publish(server, "a", "two"))[0] == 200
            one = await events.next_of("message")
            two = await events.next_of("message")
    assert pop_ts(one["data"]) == {"type": "message", "channel": "b", "offset": 1, "data": {"n": 1}}
    assert one["id"] == f"{epoch_a}:0,{epoch_b}:1"
    assert two["data"]["data"] == "two" and two["id"] == f"{epoch_a}:1,{epoch_b}:1"


async def test_sse_last_event_id_resumes_every_channel_without_loss_or_repeats() -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            async with sse(server, "channel=a&channel=b") as events:
                await events.next_of("subscribed")
                await events.next_of("subscribed")
                await publish(server, "a", 1)
                await publish(server, "b", 1)
                await events.next_of("message")
                await events.next_of("message")
                last = events.last_id
            assert last is not None
            # missed while away, on both channels
            for n in (2, 3):
                await publish(server, "a", n)
                await publish(server, "b", n)
            async with sse(server, "channel=a&channel=b", {"Last-Event-ID": last}) as events:
                got, subscribed = [], []
                while len(got) < 4:
                    event = await events.next_of("subscribed", "message")
                    (got if event["event"] == "message" else subscribed).append(event["data"])
                assert [s["recovered"] for s in subscribed] == [True, True]
                await publish(server, "b", 4)
                got.append((await events.next_of("message"))["data"])
    assert messages(got) == [("a", 2, 2), ("a", 3, 3), ("b", 2, 2), ("b", 3, 3), ("b", 4, 4)]


async def test_sse_resumes_from_a_websocket_position_and_says_when_it_cannot() -> None:
    """A client that switches from WebSocket to SSE passes its positions as since."""
    with trio.fail_after(10):
        async with running_server() as server:
            async with open_client(server) as ws:
                subscribed = await ws.subscribe("a")
                await ws.send({"type": "publish", "channel": "a", "data": "seen", "ref": 1})
                answers = {(await ws.recv())["type"], (await ws.recv())["type"]}
                assert answers == {"ack", "message"}
            await publish(server, "a", "missed")
            epoch = subscribed["epoch"]
            async with sse(server, f"channel=a&channel=b&since={epoch}:1&since=0123abcd:7") as events:
                a = await events.next_of("subscribed")
                missed = await events.next_of("message")
                b = await events.next_of("subscribed")
    assert a["data"]["recovered"] is True and a["id"].startswith(f"{epoch}:1,")
    assert missed["data"]["data"] == "missed" and missed["id"].startswith(f"{epoch}:2,")
    # an epoch the server never had: the client is told instead of silently losing messages
    assert b["data"]["recovered"] is False


async def test_sse_state_channel_value_after_subscribed_is_resumed_if_cut_between() -> None:
    with trio.fail_after(10):
        async with running_server(channels=[{"pattern": "prices.*", "mode": "state"}]) as server:
            for price in (1, 2, 3):
                await publish(server, "prices.x", price)
            async with sse(server, "channel=prices.x") as events:
                sub = await events.next_of("subscribed")
                value = await events.next_of("message")
    epoch = sub["data"]["epoch"]
    assert value["data"]["data"] == 3
    # the position right after `subscribed` is before the value, so a stream cut there
    # gets the value again on resume; after the value it is the value's offset
    assert sub["id"] == f"{epoch}:2" and value["id"] == f"{epoch}:3"
    async with running_server(channels=[{"pattern": "prices.*", "mode": "state"}]) as server:
        await publish(server, "prices.x", 5)
        status, answer = await poll(server, "channel=prices.x&timeout=0")
        assert status == 200 and messages(answer["events"]) == [("prices.x", 1, 5)]
        status, again = await poll(server, f"channel=prices.x&since={answer['since'][0]}&timeout=0")
        assert messages(again["events"]) == [] and again["since"] == answer["since"]


async def test_sse_ends_with_a_close_event_when_the_server_drains() -> None:
    with trio.fail_after(10):
        async with running_server(drain_window=1.0) as server:
            async with sse(server, "channel=a") as events:
                await events.next_of("subscribed")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(server.drain)
                    close = await events.next_of("close")
                    assert await events.next() is None  # the response ended
    assert close["data"]["code"] == 1001
    assert 0 <= json.loads(close["data"]["reason"])["reconnect_after_ms"] <= 1000


async def test_sse_closes_with_4001_when_the_token_expires() -> None:
    with trio.fail_after(10):
        async with auth_server() as server:
            tok = token(exp=int(time.time()) + 2)
            async with sse(server, f"channel=a&token={tok}") as events:
                assert events.status == 200
                close = await events.next_of("subscribed", "close")
                if close["event"] == "subscribed":
                    close = await events.next_of("close")
    assert close["data"] == {"type": "close", "code": 4001, "reason": "token expired"}


async def test_sse_slow_reader_is_closed_with_4002_and_recovers_from_its_position() -> None:
    with trio.fail_after(20):
        async with running_server(send_queue_size=4096, max_message_size=2048,
                                  channels=[{"pattern": "*", "history_size": 1000}]) as server:
            async with sse(server, "channel=a") as events:
                await events.next_of("subscribed")
                # the client reads nothing while 400 kB are published
                for n in range(200):
                    await publish(server, "a", "x" * 2000)
                seen = []
                while (event := await events.next_of("message", "close"))["event"] == "message":
                    seen.append(event["data"]["offset"])
                last = events.last_id
            assert event["data"]["code"] == 4002
            assert last is not None
            async with sse(server, "channel=a", {"Last-Event-ID": last}) as events:
                sub = await events.next_of("subscribed")
                assert sub["data"]["recovered"] is True
                while len(seen) < 200:
                    seen.append((await events.next_of("message"))["data"]["offset"])
    assert seen == list(range(1, 201))


async def test_sse_gap_on_a_drop_channel_moves_the_position_past_it() -> None:
    with trio.fail_after(20):
        async with running_server(send_queue_size=4096, max_message_size=2048,
                                  channels=[{"pattern": "*", "slow_consumer": "drop"}]) as server:
            async with sse(server, "channel=a") as events:
                epoch = (await events.next_of("subscribed"))["data"]["epoch"]
                for n in range(300):  # the client reads nothing meanwhile
                    await publish(server, "a", "x" * 1500)
                seen, gaps = [], []
                while not seen or seen[-1] < 300:
                    event = await events.next_of("message", "gap")
                    if event["event"] == "gap":
                        gaps.append((event["data"]["from"], event["data"]["to"], event["id"]))
                        seen.append(event["data"]["to"])
                    else:
                        seen.append(event["data"]["offset"])
    assert gaps, "the stream should have skipped some messages"
    for first, last, event_id in gaps:
        assert first <= last and event_id == f"{epoch}:{last}"
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


async def test_a_client_that_goes_away_leaves_nothing_behind() -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            async with sse(server, "channel=a&channel=b") as events:
                await events.next_of("subscribed")
                await events.next_of("subscribed")
                assert len(server.connections) == 1 and server.security.caps.count == 1
            for _ in range(100):
                if not server.connections:
                    break
                await trio.sleep(0.01)
            assert not server.connections and server.security.caps.count == 0
            assert not len(server.hub.get("a").members) and not len(server.hub.get("b").members)


async def test_sse_ping_event_keeps_the_stream_alive() -> None:
    with trio.fail_after(10):
        async with running_server(heartbeat=0.2) as server, sse(server, "channel=a") as events:
            await events.next_of("subscribed")
            ping = await events.next()
    assert ping == {"event": "ping", "data": {"type": "ping"}}


# --------------------------------------------------------------------------- poll


async def test_poll_answers_at_once_with_what_is_newer_than_since() -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            await publish(server, "a", 1)
            status, first = await poll(server, "channel=a&timeout=0")
            assert status == 200
            [sub] = first["events"]
            assert sub["type"] == "subscribed" and sub["offset"] == 1
            since = first["since"][0]
            assert since == f"{sub['epoch']}:1"
            await publish(server, "a", 2)
            await publish(server, "a", 3)
            started = trio.current_time()
            status, second = await poll(server, f"channel=a&since={since}")
            assert trio.current_time() - started < 2  # did not wait for poll_timeout
    assert second["events"][0]["recovered"] is True
    assert messages(second["events"]) == [("a", 2, 2), ("a", 3, 3)]
    assert second["since"] == [f"{sub['epoch']}:3"]


async def test_poll_waits_for_the_next_message() -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            _, first = await poll(server, "channel=a&channel=b&timeout=0")
            query = "channel=a&channel=b&" + "&".join(f"since={s}" for s in first["since"])
            async with trio.open_nursery() as nursery:
                async def later() -> None:
                    await trio.sleep(0.3)
                    await publish(server, "b", "late")
                nursery.start_soon(later)
                started = trio.current_time()
                status, answer = await poll(server, query)
                waited = trio.current_time() - started
    assert status == 200 and 0.25 <= waited < 5
    assert messages(answer["events"]) == [("b", 1, "late")]
    assert answer["since"][0] == first["since"][0] and answer["since"][1].endswith(":1")


async def test_poll_times_out_after_poll_timeout_with_no_messages() -> None:
    with trio.fail_after(10):
        async with running_server(poll_timeout=0.4) as server:
            started = trio.current_time()
            _, first = await poll(server, "channel=a&timeout=30")  # no since: answered at once
            assert trio.current_time() - started < 0.3
            started = trio.current_time()
            status, answer = await poll(server, f"channel=a&since={first['since'][0]}&timeout=30")  # capped
            waited = trio.current_time() - started
            _, quick = await poll(server, f"channel=a&since={answer['since'][0]}&timeout=0.1")
            assert not server.connections  # nothing left subscribed after the polls
            assert not len(server.hub.get("a").members)
    assert status == 200 and 0.35 <= waited < 3
    assert [e["type"] for e in answer["events"]] == ["subscribed"]
    assert [e["type"] for e in quick["events"]] == ["subscribed"] and quick["events"][0]["recovered"] is True


async def test_poll_is_answered_with_a_close_event_when_the_server_drains() -> None:
    with trio.fail_after(10):
        async with running_server(drain_window=0.5) as server:
            async with trio.open_nursery() as nursery:
                async def drain_soon() -> None:
                    await trio.sleep(0.2)
                    await server.drain()
                _, first = await poll(server, "channel=a&timeout=0")
                nursery.start_soon(drain_soon)
                status, answer = await poll(server, f"channel=a&since={first['since'][0]}")
    assert status == 200 and answer["events"][-1]["type"] == "close" and answer["events"][-1]["code"] == 1001


# --------------------------------------------------------------------------- auth, origins, limits


async def test_auth_is_the_same_as_for_websocket() -> None:
    with trio.fail_after(10):
        async with auth_server() as server:
            for path in ("/sse?channel=a", "/poll?channel=a&timeout=0"):
                status, body, headers = await http_request(server, "GET", path)
                assert status == 401 and json.loads(body)["reason"] == "missing", path
                assert headers["www-authenticate"].startswith("Bearer")
                status, body, _ = await http_request(server, "GET", path + "&token=not.a.jwt")
                assert status == 401 and json.loads(body)["reason"] == "malformed"
            status, body = await publish(server, "a", 1)
            assert status == 401 and body["reason"] == "missing"
            # the backend's API-key route does not take a user's token
            status, _ = await publish(server, "a", 1, {"Authorization": f"Bearer {token()}"}, path="/api/publish")
            assert status == 401
            limited = token(channels=["chat.*"], publish=["chat.mine"])
            bearer = {"Authorization": f"Bearer {limited}"}
            status, answer = await poll(server, "channel=chat.x&timeout=0", bearer)
            assert status == 200
            status, answer = await poll(server, f"channel=chat.x&channel=admin&timeout=0&token={limited}")
            assert status == 403 and answer["error"] == "forbidden" and answer["channel"] == "admin"
            async with sse(server, "channel=secret", bearer) as events:
                assert events.status == 403
                assert (await events.read_error())["channel"] == "secret"
            status, answer = await publish(server, "chat.other", 1, bearer)
            assert status == 403 and "publishing to 'chat.other'" in answer["message"]
            status, ack = await publish(server, "chat.mine", {"hi": 1}, bearer)
    assert status == 200 and ack["offset"] == 1 and ack["channel"] == "chat.mine"


async def test_no_channel_is_a_control_only_stream_and_a_token_check() -> None:
    with trio.fail_after(10):
        async with auth_server(heartbeat=0.2) as server:
            status, answer = await poll(server, f"timeout=0&token={token()}")
            assert status == 200 and answer == {"events": [], "since": []}
            assert (await http_request(server, "GET", "/poll?timeout=0"))[0] == 401
            async with sse(server, f"token={token()}") as events:
                assert (await events.next_of())["event"] == "ping"
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(server.drain)
                    assert (await events.next_of("close"))["data"]["code"] == 1001


async def test_client_publish_rules_apply_over_http() -> None:
    with trio.fail_after(10):
        async with running_server(channels=[{"pattern": "prices.*", "client_publish": False}]) as server:
            status, answer = await publish(server, "prices.x", 1)
            assert status == 403 and "client_publish = false" in answer["message"]
            for body, needle in ((b"nope", "not valid JSON"), (b"[]", "JSON object"),
                                 (b'{"channel": "a"}', "data"), (b'{"channel": "", "data": 1}', "empty"),
                                 (b'{"channel": "a", "data": 1e400}', "non-finite")):
                status, raw, _ = await http_request(server, "POST", "/publish", body)
                assert status == 400 and needle in json.loads(raw)["message"], body
            status, _, headers = await http_request(server, "GET", "/publish")
            assert status == 405 and headers["allow"] == "POST"
            status, _, headers = await http_request(server, "POST", "/sse?channel=a", b"")
            assert status == 405 and headers["allow"] == "GET"


async def test_origins_cors_and_preflight() -> None:
    with trio.fail_after(10):
        async with running_server(auth=AuthConfig(allowed_origins=("http://app.test",))) as server:
            good = {"Origin": "http://app.test"}
            status, _, headers = await http_request(server, "GET", "/poll?channel=a&timeout=0", headers=good)
            assert status == 200 and headers["access-control-allow-origin"] == "http://app.test"
            status, body, _ = await http_request(server, "GET", "/poll?channel=a&timeout=0",
                                                 headers={"Origin": "http://evil.test"})
            assert status == 403 and json.loads(body)["reason"] == "origin"
            async with sse(server, "channel=a", {"Origin": "http://evil.test"}) as events:
                assert events.status == 403
            status, _ = await publish(server, "a", 1, {"Origin": "http://evil.test"})
            assert status == 403
            status, _, headers = await http_request(server, "OPTIONS", "/publish", headers={
                **good, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            assert status == 204 and headers["access-control-allow-origin"] == "http://app.test"
            assert "authorization" in headers["access-control-allow-headers"].lower()
            assert "POST" in headers["access-control-allow-methods"]
            status, _, _ = await http_request(server, "OPTIONS", "/publish", headers={"Origin": "http://evil.test"})
            assert status == 403


async def test_bad_requests_say_what_is_wrong() -> None:
    cases = {
        "channel=a&channel=a": "listed twice",
        "channel=": "must not be empty",
        "channel=a&since=12": "EPOCH:OFFSET",
        "channel=a&since=e:x": "EPOCH:OFFSET",
        "channel=a&since=e:1&since=e:2": "2 since values for 1 channels",
        "channel=a&timeout=soon": "timeout must be a number",
        "channel=a&timeout=-1": "timeout must be a number",
    }
    with trio.fail_after(10):
        async with running_server() as server:
            for query, needle in cases.items():
                status, answer = await poll(server, query)
                assert status == 400 and needle in answer["message"], (query, answer)
            async with sse(server, "channel=a&channel=b", {"Last-Event-ID": "e:1"}) as events:
                assert events.status == 400
                assert "1 positions for 2 channels" in (await events.read_error())["message"]
            assert not server.connections and server.security.caps.count == 0


async def test_limits_apply_to_http_clients() -> None:
    limits = LimitsConfig(messages_per_second=1, messages_burst=3, max_subscriptions=2)
    with trio.fail_after(10):
        async with running_server(limits=limits) as server:
            statuses = [(await publish(server, "a", n))[0] for n in range(5)]
            status, body, headers = await http_request(
                server, "POST", "/publish", b'{"channel": "a", "data": 0}')
            assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429]
            assert status == 429 and json.loads(body)["error"] == "rate_limited" and headers["retry-after"]
    with trio.fail_after(10):
        async with running_server(limits=LimitsConfig(max_subscriptions=2)) as server:
            status, answer = await poll(server, "channel=a&channel=b&channel=c&timeout=0")
    assert status == 403 and "max_subscriptions=2" in answer["message"]


async def test_client_js_is_served_to_any_origin() -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            status, body, headers = await http_request(server, "GET", "/client.js")
            assert (await http_request(server, "HEAD", "/client.js"))[0] == 200
            assert (await http_request(server, "POST", "/client.js", b""))[0] == 405
    assert status == 200 and headers["access-control-allow-origin"] == "*"
    assert headers["content-type"].startswith("text/javascript")
    assert b"export class Relay" in body


async def test_a_subscription_the_broker_refuses_ends_the_stream_with_1013() -> None:
    """With Redis down the broker answers a subscribe with ``error unavailable``; an HTTP
    transport has no request to answer, so it ends with 1013 (come back later)."""
    with trio.fail_after(10):
        async with running_server() as server:
            sub = fallback._Subscriber(server, ANONYMOUS, fallback._SSE_CODEC, [("a", Since("e1", 4))], "peer")
            assert sub.event_id() == "e1:4"  # the position asked for, until subscribed says more
            sub.send({"type": "error", "code": "unavailable", "message": "redis is unreachable"})
            assert sub.take() == [] and sub.close_event() == {
                "type": "close", "code": 1013, "reason": "unavailable: redis is unreachable"}


@pytest.mark.parametrize(("text", "expected"), [
    ("", None), ("ab12:0", ("ab12", 0)), (" ab12:17 ", ("ab12", 17)),
])
def test_parse_position(text: str, expected: tuple[str, int] | None) -> None:
    found = parse_position(text, "since")
    assert (None if found is None else (found.epoch, found.offset)) == expected


@pytest.mark.parametrize("text", ["12", ":1", "e:", "e:-1", "e:1x", "a,b:1", "e:" + "9" * 21])
def test_parse_position_refuses(text: str) -> None:
    with pytest.raises(Exception, match="EPOCH:OFFSET"):
        parse_position(text, "since")
