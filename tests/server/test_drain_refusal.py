"""An upgrade that arrives while the server drains (on a connection accepted before) is
refused with 503 and Retry-After: 1, so the client goes to another node at once."""

from __future__ import annotations

import trio

from .conftest import running_server
from .test_bad_input import raw_ws


async def test_an_upgrade_during_the_drain_gets_503_with_retry_after() -> None:
    with trio.fail_after(15):
        async with running_server(drain_timeout=5, drain_window=0) as server, trio.open_nursery() as nursery:
            # a client that never answers the close keeps the drain going
            stubborn = await raw_ws(server)
            late = await trio.open_tcp_stream("127.0.0.1", server.port)  # accepted before the drain
            while server.pending_connections < 1:
                await trio.sleep(0.01)
            nursery.start_soon(server.drain)
            while not server.draining:
                await trio.sleep(0.01)
            await late.send_all(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = await late.receive_some(4096)
                assert chunk, answer
                answer += chunk
            head = answer.split(b"\r\n\r\n")[0].lower()
            assert head.startswith(b"http/1.1 503"), answer
            assert b"\r\nretry-after: 1" in head, answer
            await late.aclose()
            await stubborn.aclose()
