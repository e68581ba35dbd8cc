"""Tokens end to end, against a server with authentication on: 401 at the handshake, 4001 at
expiry, token_callback, refresh, and channel claims."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import jwt
import pytest
import trio

from relay.client import (
    ClientClosed,
    Connected,
    Disconnected,
    Lost,
    Message,
    Reconnecting,
    RequestFailed,
    SubscriptionEnded,
    connect,
)
from relay.config import AuthConfig, LimitsConfig
from relay.server.app import RelayServer

from .conftest import Recorder, running_proxy, running_server

SECRET = "a-client-test-secret-of-at-least-32-bytes"
FAST = {"min_backoff": 0.01, "max_backoff": 0.05}


def token(expires_in: float = 60.0, sub: str = "alice", **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + expires_in), **claims}, SECRET, algorithm="HS256")


@asynccontextmanager
async def auth_server(**overrides: Any) -> AsyncIterator[RelayServer]:
    async with running_server(auth=AuthConfig(jwt_secret=SECRET), **overrides) as server:
        yield server


async def test_expiry_closes_4001_and_token_callback_reconnects_without_loss() -> None:
    rec = Recorder()
    calls: list[int] = []

    async def fresh() -> str:
        calls.append(len(rec.of(Connected)))
        return token()

    with trio.fail_after(15):
        async with auth_server() as server, running_proxy(server.port) as proxy, \
                connect(server.url, token=token()) as pub, \
                connect(proxy.url, token=token(expires_in=1), token_callback=fresh, on_event=rec, **FAST) as c:
            sub = await c.subscribe("exp")
            await sub.wait_subscribed()
            await pub.publish("exp", 1)
            gone = await rec.wait_for(Disconnected)  # the token runs out: 4001
            for i in range(2, 5):
                await pub.publish("exp", i)  # while the subscriber is away
            await rec.wait_for(Connected, 2)
            await pub.publish("exp", 5)
            assert [(await sub.__anext__()).data for _ in range(5)] == [1, 2, 3, 4, 5]
    assert (gone.code, gone.reason) == (4001, "token expired")
    assert calls == [1]  # once, after the first connection and before the second
    auth = proxy.authorizations()
    assert len(auth) == 2 and auth[0] != auth[1]
    assert not rec.of(Lost)


async def test_401_at_the_handshake_asks_token_callback() -> None:
    rec = Recorder()
    with trio.fail_after(10):
        async with auth_server() as server, \
                connect(server.url, token=token(expires_in=-30), token_callback=token, on_event=rec, **FAST) as c:
            await c.wait_connected()
            ack = await c.publish("a", 1)
            assert ack.offset == 1
    refused = rec.of(Disconnected)[0]
    assert refused.http_status == 401 and refused.code is None and "expired" in refused.reason


async def test_401_without_token_callback_ends_the_client() -> None:
    with trio.fail_after(10):
        async with auth_server() as server, connect(server.url, **FAST) as c:
            with pytest.raises(ClientClosed, match="401") as info:
                await c.wait_connected()
    assert info.value.http_status == 401 and "token_callback" in str(info.value)


async def test_refresh_keeps_the_connection_and_is_used_when_reconnecting() -> None:
    rec = Recorder()
    with trio.fail_after(10):
        async with auth_server() as server, running_proxy(server.port) as proxy, \
                connect(proxy.url, token=token(expires_in=30), on_event=rec, **FAST) as c:
            await c.wait_connected()
            later = token(expires_in=3600)
            expires = await c.refresh(later)
            assert expires is not None and abs(expires - (time.time() + 3600)) < 5
            assert len(rec.of(Connected)) == 1  # the same connection
            with pytest.raises(RequestFailed) as info:
                await c.refresh(token(sub="mallory"))
            assert info.value.code == "unauthorized"
            proxy.cut()
            await rec.wait_for(Connected, 2)
            assert proxy.authorizations()[-1] == f"Bearer {later}"


async def test_refresh_that_drops_a_channel_ends_its_subscription() -> None:
    with trio.fail_after(10):
        async with auth_server() as server, \
                connect(server.url, token=token(channels=["a.*", "b.*"])) as c:
            await c.wait_connected()
            a = await c.subscribe("a.1")
            b = await c.subscribe("b.1")
            with pytest.raises(RequestFailed) as info:
                await c.subscribe("c.1")  # outside the claims
            assert info.value.code == "forbidden"
            await c.refresh(token(channels=["b.*"]))
            with pytest.raises(SubscriptionEnded) as ended:
                await a.__anext__()
            assert ended.value.channel == "a.1"
            ack = await c.publish("b.1", "still here")
            assert await b.__anext__() == Message("b.1", 1, "still here", ack.epoch)
            assert c.statistics().subscriptions == 1


async def test_server_full_503_waits_its_retry_after() -> None:
    rec = Recorder()
    with trio.fail_after(10):
        async with running_server(limits=LimitsConfig(max_connections=1)) as server, \
                connect(server.url) as first:
            await first.wait_connected()
            async with connect(server.url, on_event=rec, **FAST):
                again = await rec.wait_for(Reconnecting)
    refused = rec.of(Disconnected)[0]
    assert refused.http_status == 503
    assert 5.0 <= again.delay <= 5.0 + FAST["min_backoff"]  # Retry-After: 5, plus jitter
