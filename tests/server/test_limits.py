"""Limits from outside, over loopback: a flooding client gets rate_limited then close 4003
while a well-behaved one is unaffected; subscription caps; connection caps (503 before
the upgrade, slots given back when connections end)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relay.config import LimitsConfig
from relay.server.app import RelayServer

from .conftest import Client, http_request, open_client, running_server

UNLIMITED = dict(messages_per_second=0, bytes_per_second=0)


async def drain_until_close(c: Client, timeout: float = 5) -> tuple[list[dict[str, Any]], int | None]:
    """Read until the server closes; return what came and the close code."""
    got: list[dict[str, Any]] = []
    with trio.fail_after(timeout):
        try:
            while True:
                got.append(await c.recv())
        except ConnectionClosed as exc:
            return got, exc.rcvd.code if exc.rcvd else None


async def test_flooding_client_is_rate_limited_then_closed_4003_while_others_are_fine() -> None:
    limits = LimitsConfig(messages_per_second=5, messages_burst=5, bytes_per_second=0, rate_limit_strikes=3)
    with trio.fail_after(10):
        async with running_server(limits=limits) as server, \
                open_client(server) as flood, open_client(server) as calm:
            await calm.subscribe("news")
            for i in range(50):
                try:
                    await flood.send({"type": "ping", "ref": i})
                except ConnectionClosed:
                    break  # closed mid-flood, as it should be
            got, code = await drain_until_close(flood)
            assert code == 4003
            pongs = [m for m in got if m["type"] == "pong"]
            errors = [m for m in got if m["type"] == "error"]
            assert [m["ref"] for m in pongs] == [0, 1, 2, 3, 4]
            # the refusals before the close carry the refs of the dropped messages
            assert [m["ref"] for m in errors] == [5, 6, 7] and {m["code"] for m in errors} == {"rate_limited"}
            assert "messages_per_second=5" in errors[0]["message"]
            # the calm client, on the same server, still gets answers and deliveries
            assert (await calm.request({"type": "ping", "ref": "c"}))["type"] == "pong"
            metrics = server.metrics.render().decode()
            assert 'relay_errors_total{code="rate_limited"} 3.0' in metrics


async def test_rate_refills_so_a_steady_client_is_never_limited() -> None:
    limits = LimitsConfig(messages_per_second=50, messages_burst=5, bytes_per_second=0)
    with trio.fail_after(10):
        async with running_server(limits=limits) as server, open_client(server) as c:
            for i in range(20):
                assert (await c.request({"type": "ping", "ref": i}))["type"] == "pong"
                await trio.sleep(0.03)


async def test_bytes_per_second_limits_large_publishes() -> None:
    limits = LimitsConfig(messages_per_second=0, bytes_per_second=20_000, bytes_burst=20_000, rate_limit_strikes=50)
    with trio.fail_after(10):
        async with running_server(limits=limits) as server, open_client(server) as c:
            answers = []
            for i in range(4):
                answers.append(await c.request(
                    {"type": "publish", "channel": "big", "data": "x" * 9000, "ref": i}))
            assert [a["type"] for a in answers] == ["ack", "ack", "error", "error"]
            assert answers[2]["code"] == "rate_limited" and answers[2]["ref"] == 2
            # small messages still fit in what is left
            assert (await c.request({"type": "ping", "ref": "p"}))["type"] == "pong"


async def test_max_subscriptions() -> None:
    with trio.fail_after(10):
        async with running_server(limits=LimitsConfig(max_subscriptions=2, **UNLIMITED)) as server, \
                open_client(server) as c:
            await c.subscribe("a")
            await c.subscribe("b")
            answer = await c.request({"type": "subscribe", "channel": "c", "ref": 3})
            assert (answer["type"], answer["code"], answer["ref"]) == ("error", "forbidden", 3)
            assert "max_subscriptions=2" in answer["message"]
            # already subscribed: the usual answer, not the cap
            answer = await c.request({"type": "subscribe", "channel": "a", "ref": 4})
            assert answer["code"] == "bad_request"
            await c.request({"type": "unsubscribe", "channel": "a"})
            await c.subscribe("c")


async def refused(server: RelayServer) -> tuple[int, dict[str, Any], dict[str, str]]:
    with pytest.raises(InvalidStatus) as info:
        async with open_client(server):
            pass
    response = info.value.response
    return response.status_code, json.loads(response.body), {k.lower(): v for k, v in response.headers.raw_items()}


async def test_connections_per_ip_are_capped_and_slots_come_back() -> None:
    with trio.fail_after(10):
        async with running_server(limits=LimitsConfig(max_connections_per_ip=2, **UNLIMITED)) as server:
            async with open_client(server), open_client(server):
                status, body, headers = await refused(server)
                assert status == 503 and body["error"] == "over_capacity"
                assert "max_connections_per_ip=2" in body["message"] and headers["retry-after"] == "5"
                assert len(server.connections) == 2
            with trio.fail_after(3):
                while server.security.caps.count:
                    await trio.sleep(0.01)
            async with open_client(server), open_client(server):
                pass
            assert 'relay_handshakes_refused_total{reason="over_capacity"} 1.0' in server.metrics.render().decode()


async def test_total_connections_are_capped() -> None:
    with trio.fail_after(10):
        async with running_server(limits=LimitsConfig(max_connections=1, **UNLIMITED)) as server:
            async with open_client(server) as c:
                status, body, _ = await refused(server)
                assert status == 503 and "max_connections=1" in body["message"]
                assert (await c.request({"type": "ping"}))["type"] == "pong"


async def test_refused_handshakes_hold_no_slot() -> None:
    """Refusals for other reasons (subprotocol, origin) give their slot back at once."""
    with trio.fail_after(10):
        async with running_server(limits=LimitsConfig(max_connections=1, **UNLIMITED)) as server:
            for _ in range(3):
                with pytest.raises(InvalidStatus):
                    async with open_client(server, subprotocols=["unknown.v9"]):
                        pass
            assert server.security.caps.count == 0
            async with open_client(server):
                pass


async def _idle_socket(server: RelayServer) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", server.port)


async def test_sockets_that_never_send_a_request_are_capped_and_websockets_do_not_count() -> None:
    """max_pending_connections: TCP connections waiting for a request are bounded; past the
    cap a new one gets 503 and is closed before anything is read; open WebSockets, and
    connections that were served, do not count."""
    limits = LimitsConfig(messages_per_second=0, bytes_per_second=0, max_pending_connections=3)
    with trio.fail_after(15):
        async with running_server(limits=limits, handshake_timeout=30) as server:
            # WebSockets past the handshake are not pending: more of them than the cap is fine
            async with open_client(server) as a, open_client(server) as b, open_client(server) as c, \
                    open_client(server) as d:
                idle = [await _idle_socket(server) for _ in range(3)]
                while server.pending_connections < 3:
                    await trio.sleep(0.01)
                refused = await _idle_socket(server)
                answer = b""
                while chunk := await refused.receive_some(4096):
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 503 "), answer
                assert b"Retry-After: 5" in answer and b"max_pending_connections=3" in answer
                # the idle ones were not disturbed, nor were the WebSockets
                assert (await a.request({"type": "ping", "ref": 1}))["type"] == "pong"
                for client in (b, c, d):
                    assert (await client.request({"type": "ping", "ref": 2}))["type"] == "pong"
                # one idle socket sends its request and is served: a place frees up
                await idle[0].send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                response = b""
                while chunk := await idle[0].receive_some(4096):
                    response += chunk
                assert response.startswith(b"HTTP/1.1 200 "), response
                while server.pending_connections > 2:
                    await trio.sleep(0.01)
                async with open_client(server) as e:
                    assert (await e.request({"type": "ping", "ref": 3}))["type"] == "pong"
                for sock in idle[1:]:
                    await sock.aclose()
                while server.pending_connections:
                    await trio.sleep(0.01)
            _, metrics, _ = await http_request(server, "GET", "/metrics")
    assert b'relay_handshakes_refused_total{reason="too_many_pending"} 1.0' in metrics
