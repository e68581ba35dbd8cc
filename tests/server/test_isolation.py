"""Failures stay inside one connection; drain closes everyone gracefully (in-process)."""

from __future__ import annotations

import json
import logging
from typing import Any

import h11
import pytest
import trio
from websockets.exceptions import ConnectionClosed

from .conftest import open_client, running_server


async def test_unexpected_error_closes_only_that_connection_with_1011(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(10):
        async with running_server() as server, open_client(server) as bystander, open_client(server) as victim:
            await bystander.subscribe("calm")
            real_subscribe = server.hub.subscribe

            def faulty_subscribe(sub: Any, name: str, *args: Any) -> None:
                if name == "boom":
                    raise RuntimeError("injected fault")
                real_subscribe(sub, name, *args)

            server.hub.subscribe = faulty_subscribe  # type: ignore[method-assign]
            with caplog.at_level(logging.ERROR, logger="relay.server"):
                await victim.send({"type": "subscribe", "channel": "boom"})
                with pytest.raises(ConnectionClosed) as info:
                    await victim.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1011
            assert any(victim.welcome["session"] in r.getMessage() and r.exc_info for r in caplog.records)
            # everyone else carries on
            await bystander.send({"type": "publish", "channel": "calm", "data": "still here", "ref": 1})
            assert (await bystander.recv())["data"] == "still here"
            assert (await bystander.recv())["type"] == "ack"
            async with open_client(server) as newcomer:
                assert (await newcomer.request({"type": "ping", "ref": 1}))["type"] == "pong"


async def test_drain_closes_clients_with_1001_and_hint_and_readyz_turns_503() -> None:
    with trio.fail_after(15):
        async with running_server(drain_window=2.0, drain_timeout=5.0) as server:
            clients = []
            async with open_client(server) as a, open_client(server, "msgpack") as b:
                clients = [a, b]
                await a.subscribe("x")
                # a plain-HTTP keep-alive connection opened before the drain
                stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                conn = h11.Connection(h11.CLIENT)

                async def get(path: str) -> tuple[int, dict[str, str]]:
                    await stream.send_all(conn.send(h11.Request(method="GET", target=path, headers=[("Host", "x")]))
                                          + conn.send(h11.EndOfMessage()))
                    status, headers = 0, {}
                    while True:
                        ev = conn.next_event()
                        if ev is h11.NEED_DATA:
                            conn.receive_data(await stream.receive_some(4096))
                        elif isinstance(ev, h11.Response):
                            status = ev.status_code
                            headers = {k.decode(): v.decode() for k, v in ev.headers}
                        elif isinstance(ev, h11.EndOfMessage):
                            return status, headers

                assert (await get("/readyz"))[0] == 200
                conn.start_next_cycle()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(server.drain)
                    while not server.draining:
                        await trio.sleep(0)
                    status, headers = await get("/readyz")
                    assert status == 503 and headers.get("connection") == "close"
                    for c in clients:
                        with pytest.raises(ConnectionClosed) as info:
                            while True:
                                await c.recv()
                        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
                        hint = json.loads(info.value.rcvd.reason)
                        assert 0 <= hint["reconnect_after_ms"] <= 2000
                await stream.aclose()
            # new connections are refused once draining
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", server.port)
