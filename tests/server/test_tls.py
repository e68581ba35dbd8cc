"""TLS from outside, over loopback: wss:// and https:// on one port with a trustme CA;
an untrusted CA or plain text on the TLS port fails the handshake without a traceback;
fan-out over TLS delivers every frame intact (writes go through the TLS stream)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trustme

from relay.config import Config, TlsConfig
from relay.errors import ConfigError
from relay.server.app import RelayServer

from .conftest import open_client, running_server


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> TlsConfig:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    for blob in cert.cert_chain_pems:
        blob.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    return TlsConfig(str(cert_path), str(key_path))


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@asynccontextmanager
async def tls_server(tls: TlsConfig, **overrides: Any) -> AsyncIterator[RelayServer]:
    async with running_server(tls=tls, **overrides) as server:
        yield server


async def https_get(server: RelayServer, context: ssl.SSLContext, path: str) -> tuple[int, bytes]:
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", server.port, ssl_context=context,
                                                 https_compatible=True)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        await stream.send_all(conn.send(h11.Request(method="GET", target=path, headers=[
            ("Host", f"127.0.0.1:{server.port}"), ("Connection", "close")])) + conn.send(h11.EndOfMessage()))
        status, body = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, bytes(body)


async def test_wss_and_https_on_one_port(ca: trustme.CA, tls_files: TlsConfig) -> None:
    context = client_context(ca)
    with trio.fail_after(10):
        async with tls_server(tls_files) as server:
            assert server.url.startswith("wss://") and server.http_url.startswith("https://")
            async with open_client(server, ssl=context) as c:
                assert (await c.request({"type": "ping", "ref": 1}))["type"] == "pong"
                # writes go through the TLS stream, never straight to the socket
                conn = server.connections[c.welcome["session"]]
                assert conn.ws._stream.socket is None
            assert await https_get(server, context, "/healthz") == (200, b"ok\n")


async def test_untrusted_ca_fails_the_handshake_and_the_server_carries_on(
        ca: trustme.CA, tls_files: TlsConfig, caplog: pytest.LogCaptureFixture) -> None:
    stranger = client_context(trustme.CA())
    with trio.fail_after(10), caplog.at_level(logging.DEBUG, logger="relay"):
        async with tls_server(tls_files) as server:
            with pytest.raises((ssl.SSLCertVerificationError, trio.BrokenResourceError)) as info:
                async with open_client(server, ssl=stranger):
                    pass
            cause = info.value if isinstance(info.value, ssl.SSLError) else info.value.__cause__
            assert isinstance(cause, ssl.SSLCertVerificationError), repr(cause)
            with pytest.raises(trio.BrokenResourceError):
                await https_get(server, stranger, "/healthz")
            # plain HTTP on the TLS port: dropped
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                with trio.fail_after(5):
                    while await stream.receive_some(4096):
                        pass
            async with open_client(server, ssl=client_context(ca)) as c:
                assert (await c.request({"type": "ping"}))["type"] == "pong"
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_fanout_over_tls_arrives_intact_and_in_order(ca: trustme.CA, tls_files: TlsConfig) -> None:
    context = client_context(ca)
    sizes = [0, 1, 100, 125, 126, 1000, 65535 - 200, 20_000, 7, 40_000]
    n = 60
    with trio.fail_after(20):
        async with tls_server(tls_files) as server:
            async with open_client(server, ssl=context) as pub, \
                    open_client(server, ssl=context) as s1, \
                    open_client(server, "msgpack", ssl=context) as s2, \
                    open_client(server, ssl=context) as s3:
                for s in (s1, s2, s3):
                    await s.subscribe("feed")

                async def publish() -> None:
                    for i in range(n):
                        await pub.send({"type": "publish", "channel": "feed",
                                        "data": {"i": i, "pad": "x" * sizes[i % len(sizes)]}})

                async def receive(s: Any, out: list[Any]) -> None:
                    while len(out) < n:
                        msg = await s.recv()
                        assert msg["type"] == "message", msg
                        out.append(msg)

                got: list[list[Any]] = [[], [], []]
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(publish)
                    for s, out in zip((s1, s2, s3), got):
                        nursery.start_soon(receive, s, out)
            for out in got:
                assert [m["offset"] for m in out] == list(range(1, n + 1))
                assert all(m["data"] == {"i": i, "pad": "x" * sizes[i % len(sizes)]} for i, m in enumerate(out))


def test_missing_or_bad_tls_files_stop_the_server(tmp_path: Path, tls_files: TlsConfig) -> None:
    with pytest.raises(ConfigError, match="tls.cert.*cannot read"):
        RelayServer(Config(tls=TlsConfig(str(tmp_path / "nope.pem"), tls_files.key)))
    wrong = tmp_path / "wrong.pem"
    wrong.write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot load the certificate"):
        RelayServer(Config(tls=TlsConfig(str(wrong), tls_files.key)))
