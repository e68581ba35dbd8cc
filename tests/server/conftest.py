"""Fixtures for tests that drive a real in-process server over loopback.

``start_server(**overrides)`` runs a RelayServer on 127.0.0.1, port 0, in the
test's nursery; clients are the ``websockets`` library (its trio client) and
trio-websocket, speaking only the wire protocol.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio
from websockets.trio.client import ClientConnection, connect

from relay.config import ChannelOptions, Config, LimitsConfig
from relay.server.app import RelayServer

JSON_PROTO = "relay.v1.json"
MSGPACK_PROTO = "relay.v1.msgpack"


#: The tests that flood on purpose (slow consumers, batching) would trip the default
#: per-connection rate limits; tests about limits pass their own ``limits``.
UNLIMITED_RATES = LimitsConfig(messages_per_second=0, bytes_per_second=0)


@asynccontextmanager
async def running_server(**overrides: Any) -> AsyncIterator[RelayServer]:
    overrides.setdefault("limits", UNLIMITED_RATES)
    channels = overrides.pop("channels", ())
    cfg = Config(host="127.0.0.1", port=0, node_id="test", channels=tuple(
        c if isinstance(c, ChannelOptions) else ChannelOptions(**c) for c in channels
    ), **overrides)
    async with trio.open_nursery() as nursery:
        server: RelayServer = await nursery.start(RelayServer(cfg).run)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def start_server() -> Callable[..., Any]:
    return running_server


def check_ts(entry: dict[str, Any]) -> int:
    """Remove and return ``entry``'s publish time ``ts``, checked: an integer of unix
    microseconds stamped at ingress (within the last hour, not in the future)."""
    ts = entry.pop("ts", None)
    assert isinstance(ts, int) and not isinstance(ts, bool), f"no integer ts in {entry}"
    now_us = time.time() * 1_000_000
    assert now_us - 3_600_000_000 < ts <= now_us + 1_000, (ts, now_us, entry)
    return ts


def pop_ts(msg: Any) -> Any:
    """Check (:func:`check_ts`) and remove the ``ts`` of a ``message`` or ``poke``, so
    tests can compare the rest exactly; anything else is returned as it is."""
    if isinstance(msg, dict) and msg.get("type") in ("message", "poke"):
        check_ts(msg)
    return msg


class Client:
    """A protocol-speaking client over the ``websockets`` trio client."""

    def __init__(self, ws: ClientConnection, encoding: str) -> None:
        self.ws = ws
        self.encoding = encoding
        self.welcome: dict[str, Any] = {}

    async def send(self, message: dict[str, Any]) -> None:
        if self.encoding == "msgpack":
            await self.ws.send(msgpack.packb(message))
        else:
            await self.ws.send(json.dumps(message))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next message; a ``message`` or ``poke`` must carry a plausible ``ts``,
        which is checked and taken out (see :func:`pop_ts`)."""
        with trio.fail_after(timeout):
            raw = await self.ws.recv()
        if self.encoding == "msgpack":
            assert isinstance(raw, bytes), "msgpack connections get binary frames"
            msg = msgpack.unpackb(raw)
        else:
            assert isinstance(raw, str), "json connections get text frames"
            msg = json.loads(raw)
        return pop_ts(msg)  # type: ignore[no-any-return]

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        await self.send(message)
        return await self.recv()

    async def subscribe(self, channel: str, **fields: Any) -> dict[str, Any]:
        answer = await self.request({"type": "subscribe", "channel": channel, **fields})
        assert answer["type"] == "subscribed", answer
        return answer

    async def publish(self, channel: str, data: Any, ref: Any = "p") -> dict[str, Any]:
        answer = await self.request({"type": "publish", "channel": channel, "data": data, "ref": ref})
        assert answer["type"] == "ack", answer
        return answer

    async def expect_silence(self, seconds: float = 0.2) -> None:
        with trio.move_on_after(seconds):
            raw = await self.ws.recv()
            raise AssertionError(f"expected nothing, got {raw!r}")


@asynccontextmanager
async def open_client(server: RelayServer, encoding: str = "json", uri_path: str = "/ws",
                      **kwargs: Any) -> AsyncIterator[Client]:
    if encoding == "msgpack":
        kwargs.setdefault("subprotocols", [MSGPACK_PROTO])
    elif encoding == "json-explicit":
        kwargs.setdefault("subprotocols", [JSON_PROTO])
        encoding = "json"
    url = server.url[: -len("/ws")] + uri_path
    async with connect(url, **kwargs) as ws:
        client = Client(ws, encoding)
        client.welcome = await client.recv()
        assert client.welcome["type"] == "welcome"
        yield client


@pytest.fixture
def client() -> Callable[..., Any]:
    return open_client


async def http_request(server: RelayServer, method: str, path: str, body: bytes | None = None,
                       headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    """One HTTP/1.1 request over a raw trio socket (Connection: close); returns status, body, headers."""
    import h11

    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        hdrs = [("Host", f"127.0.0.1:{server.port}"), ("Connection", "close")]
        hdrs += list((headers or {}).items())
        if body is not None:
            hdrs.append(("Content-Length", str(len(body))))
        data = conn.send(h11.Request(method=method, target=path, headers=hdrs))
        if body is not None:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)
        status, out, resp_headers = 0, bytearray(), {}
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                resp_headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                out += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, bytes(out), resp_headers


async def http_get(server: RelayServer, path: str) -> tuple[int, Any]:
    status, body, headers = await http_request(server, "GET", path)
    if headers.get("content-type", "").startswith("application/json"):
        return status, json.loads(body)
    return status, body.decode()


async def http_post_json(server: RelayServer, path: str, obj: Any) -> tuple[int, Any]:
    status, body, _ = await http_request(server, "POST", path, json.dumps(obj).encode(),
                                         {"Content-Type": "application/json"})
    return status, json.loads(body)
