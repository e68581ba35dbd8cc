"""Plain HTTP on the WebSocket port: health, readiness, metrics, publish, history."""

from __future__ import annotations

import json

import pytest
import trio

from .conftest import http_get, http_post_json, http_request, open_client, running_server


async def test_healthz_readyz() -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            assert await http_get(server, "/healthz") == (200, "ok\n")
            assert await http_get(server, "/readyz") == (200, "ready\n")


async def test_http_publish_reaches_ws_subscribers_in_both_encodings() -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as j, open_client(server, "msgpack") as m:
            await j.subscribe("news")
            await m.subscribe("news")
            status, body = await http_post_json(server, "/api/publish", {"channel": "news", "data": {"h": "x"}})
            assert status == 200
            assert body["offset"] == 1 and body["channel"] == "news" and isinstance(body["epoch"], str)
            for c in (j, m):
                assert await c.recv() == {"type": "message", "channel": "news", "offset": 1, "data": {"h": "x"}}
            # the WebSocket ack and the HTTP answer agree on the epoch
            await j.send({"type": "publish", "channel": "news", "data": 2, "ref": 1})
            assert (await j.recv())["offset"] == 2
            ack = await j.recv()
            assert ack["epoch"] == body["epoch"] and ack["offset"] == 2


async def test_history_returns_retained_newest_included_with_since_and_limit() -> None:
    with trio.fail_after(10):
        async with running_server(channels=[{"pattern": "*", "history_size": 5}]) as server:
            for i in range(1, 8):
                await http_post_json(server, "/api/publish", {"channel": "h.1", "data": i})
            status, body = await http_get(server, "/api/channels/h.1/history")
            assert status == 200
            assert body["offset"] == 7
            assert [p["offset"] for p in body["publications"]] == [3, 4, 5, 6, 7]
            assert [p["data"] for p in body["publications"]] == [3, 4, 5, 6, 7]
            _, body = await http_get(server, "/api/channels/h.1/history?since=4")
            assert [p["offset"] for p in body["publications"]] == [5, 6, 7]
            _, body = await http_get(server, "/api/channels/h.1/history?since=4&limit=2")
            assert [p["offset"] for p in body["publications"]] == [5, 6]
            _, body = await http_get(server, "/api/channels/h.1/history?limit=2")
            assert [p["offset"] for p in body["publications"]] == [6, 7]
            # percent-encoded channel names
            await http_post_json(server, "/api/publish", {"channel": "a:b", "data": 1})
            status, body = await http_get(server, "/api/channels/a%3Ab/history")
            assert status == 200 and body["channel"] == "a:b"


@pytest.mark.parametrize(("path", "status", "code"), [
    ("/api/channels/nothing/history", 404, "unknown_channel"),
    ("/api/channels/x/history?since=abc", 400, "bad_request"),
    ("/api/channels/x/history?limit=0", 400, "bad_request"),
    ("/api/channels/x/history?since=-1", 400, "bad_request"),
    ("/api/channels/%00bad/history", 400, "bad_request"),
    ("/nope", 404, "not_found"),
], ids=["unknown-channel", "since-not-int", "limit-zero", "since-negative", "bad-channel", "no-route"])
async def test_http_errors(path: str, status: int, code: str) -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            await http_post_json(server, "/api/publish", {"channel": "x", "data": 1})
            got_status, body = await http_get(server, path)
            assert got_status == status and body["error"] == code and body["message"]


@pytest.mark.parametrize(("body", "fragment"), [
    (b"not json", "not valid JSON"),
    (b"[1,2]", "JSON object"),
    (b'{"channel":"x"}', "data"),
    (b'{"data":1}', "channel"),
    (b'{"channel":"","data":1}', "empty"),
    (b'{"channel":"x","data":NaN}', "NaN"),
], ids=["invalid-json", "array", "no-data", "no-channel", "empty-channel", "nan"])
async def test_http_publish_rejects_bad_bodies(body: bytes, fragment: str) -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            status, raw, _ = await http_request(server, "POST", "/api/publish", body)
            answer = json.loads(raw)
            assert status == 400 and answer["error"] == "bad_request" and fragment in answer["message"]
            # nothing was published
            assert server.hub.get("x") is None


async def test_http_publish_body_over_limit_is_413() -> None:
    with trio.fail_after(10):
        async with running_server(max_message_size=1024, send_queue_size=4096) as server:
            big = json.dumps({"channel": "x", "data": "y" * 2000}).encode()
            status, raw, _ = await http_request(server, "POST", "/api/publish", big)
            assert status == 413 and json.loads(raw)["error"] == "too_large"
            assert server.hub.get("x") is None


async def test_wrong_method_is_405_with_allow() -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            status, _, headers = await http_request(server, "GET", "/api/publish")
            assert status == 405 and headers["allow"] == "POST"
            status, _, headers = await http_request(server, "POST", "/healthz", b"")
            assert status == 405 and headers["allow"] == "GET"


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    import h11

    with trio.fail_after(10):
        async with running_server() as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                conn = h11.Connection(h11.CLIENT)
                for _ in range(3):
                    await stream.send_all(conn.send(h11.Request(
                        method="GET", target="/healthz", headers=[("Host", "x")])) + conn.send(h11.EndOfMessage()))
                    while True:
                        ev = conn.next_event()
                        if ev is h11.NEED_DATA:
                            conn.receive_data(await stream.receive_some(4096))
                        elif isinstance(ev, h11.Response):
                            assert ev.status_code == 200
                        elif isinstance(ev, h11.EndOfMessage):
                            break
                    conn.start_next_cycle()


async def test_metrics_count_connections_publications_and_deliveries() -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as a, open_client(server, "msgpack") as b:
            await a.subscribe("m")
            await b.subscribe("m")
            await a.send({"type": "publish", "channel": "m", "data": 1, "ref": 1})
            await b.recv()
            await http_post_json(server, "/api/publish", {"channel": "m", "data": 2})
            await b.recv()
            await a.request({"type": "bogus", "ref": 5})
            status, text = await http_get(server, "/metrics")
            assert status == 200
            lines = set(text.splitlines())
            assert "relay_active_connections 2.0" in lines
            assert 'relay_connections_total{encoding="json"} 1.0' in lines
            assert 'relay_connections_total{encoding="msgpack"} 1.0' in lines
            assert 'relay_publications_total{transport="websocket"} 1.0' in lines
            assert 'relay_publications_total{transport="http"} 1.0' in lines
            # two publications, each to one JSON and one msgpack subscriber
            assert 'relay_deliveries_total{encoding="json",mode="stream"} 2.0' in lines
            assert 'relay_deliveries_total{encoding="msgpack",mode="stream"} 2.0' in lines
            assert 'relay_messages_received_total{encoding="json",type="publish"} 1.0' in lines
            assert 'relay_messages_received_total{encoding="msgpack",type="subscribe"} 1.0' in lines
            assert 'relay_messages_received_total{encoding="json",type="invalid"} 1.0' in lines
            # answers sent, by type and encoding (deliveries are counted above)
            assert 'relay_messages_sent_total{encoding="json",type="welcome"} 1.0' in lines
            assert 'relay_messages_sent_total{encoding="msgpack",type="welcome"} 1.0' in lines
            assert 'relay_messages_sent_total{encoding="msgpack",type="subscribed"} 1.0' in lines
            assert 'relay_messages_sent_total{encoding="json",type="ack"} 1.0' in lines
            assert 'relay_messages_sent_total{encoding="json",type="error"} 1.0' in lines
            sent = {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith("relay_sent_bytes_total")}
            received = {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith("relay_received_bytes_total")}
            assert set(sent) == {'relay_sent_bytes_total{encoding="json"}', 'relay_sent_bytes_total{encoding="msgpack"}',
                                 'relay_sent_bytes_total{encoding="http"}'}, sent
            assert all(v > 0 for k, v in sent.items() if "http" not in k), sent
            assert all(v > 0 for v in received.values()) and len(received) == 2, received
            assert 'relay_errors_total{code="bad_request"} 1.0' in lines
            assert "relay_channels 1.0" in lines
            assert any(line.startswith('relay_info{fastpath=') for line in lines)
