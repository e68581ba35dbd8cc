"""What operators see of authentication and limits in /metrics, parsed with prometheus-client's parser."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relay.config import AuthConfig, LimitsConfig

from .conftest import http_get, open_client, running_server

SECRET = "an-hs256-secret-of-at-least-32-bytes!"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def tok(**claims: Any) -> str:
    return jwt.encode({"sub": "alice", "exp": time.time() + 60, **claims}, SECRET, algorithm="HS256")


async def test_refusals_errors_closes_and_load_are_exported() -> None:
    limits = LimitsConfig(messages_per_second=3, messages_burst=3, bytes_per_second=0, rate_limit_strikes=1)
    with trio.fail_after(10):
        async with running_server(auth=AuthConfig(jwt_secret=SECRET, api_keys=("k" * 16,)), limits=limits) as server:
            with pytest.raises(InvalidStatus):
                async with open_client(server, uri_path=f"/ws?token={tok(exp=time.time() - 10)}"):
                    pass
            async with open_client(server, uri_path=f"/ws?token={tok(channels=['ok'])}") as calm:
                assert (await calm.request({"type": "subscribe", "channel": "no", "ref": 1}))["code"] == "forbidden"
                async with open_client(server, uri_path=f"/ws?token={tok()}") as flood:
                    with pytest.raises(ConnectionClosed):
                        for i in range(20):
                            await flood.send({"type": "ping", "ref": i})
                        while True:
                            await flood.recv()
                with trio.fail_after(3):
                    while len(server.connections) > 1:
                        await trio.sleep(0.01)
                status, text = await http_get(server, "/metrics")
                assert status == 200
                got = samples(text)
    assert got[("relay_handshakes_refused_total", (("reason", "auth_expired"),))] == 1
    assert got[("relay_errors_total", (("code", "forbidden"),))] == 1
    assert got[("relay_errors_total", (("code", "rate_limited"),))] == 1
    assert got[("relay_connections_closed_total", (("code", "4003"),))] == 1
    assert got[("relay_received_bytes_total", (("encoding", "json"),))] > 0
    assert got[("relay_active_connections", ())] == 1
    assert got[("relay_client_addresses", ())] == 1
    assert ("relay_send_queue_bytes", ()) in got and ("relay_send_queue_max_bytes", ()) in got
