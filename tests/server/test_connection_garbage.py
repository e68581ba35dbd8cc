"""A connection that ends is freed at once by reference counting: it leaves nothing in
reference cycles for Python's cycle collector (``Connection.release``).

Each case ends connections a different way (the client closes, the client's TCP connection
drops, a bad frame makes the server close, the server kicks a slow consumer, the server
stops) and then asks the collector, with ``gc.DEBUG_SAVEALL``, what garbage it found: none
of it may be the server side of a connection.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio
import trio.testing
from wsproto.frame_protocol import FrameProtocol

from relay._fastpath_py import Outbox as PyOutbox
from relay.server.frontdoor import _ServerWebSocket
from relay.server.ws import Connection

from .conftest import open_client, running_server
from .test_bad_input import OP_TEXT, raw_ws

try:
    from relay._fastpath import Outbox as CyOutbox
    SERVER_TYPES: tuple[type, ...] = (Connection, _ServerWebSocket, FrameProtocol, PyOutbox, CyOutbox)
except ImportError:  # not built: the twin's Outbox is the one in use
    SERVER_TYPES = (Connection, _ServerWebSocket, FrameProtocol, PyOutbox)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Collect what earlier tests left, then keep the collector from running meanwhile."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def server_side_garbage() -> list[str]:
    """Run the collector once, keeping what it finds; return the server-side objects."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = [type(o).__qualname__ for o in gc.garbage if isinstance(o, SERVER_TYPES)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return found


async def wait_until_gone(server: Any) -> None:
    with trio.fail_after(5):
        while server.connections:
            await trio.sleep(0.01)
    await trio.testing.wait_all_tasks_blocked(0.05)


async def test_connections_that_end_leave_no_garbage_cycles() -> None:
    with collector_paused():
        async with running_server(send_queue_size=4096, channels=[
                {"pattern": "slow.*", "slow_consumer": "disconnect"}]) as server:
            # 1. clients that subscribe, publish, then close normally
            for i in range(3):
                async with open_client(server) as c, open_client(server) as p:
                    await c.subscribe("room.1")
                    await p.publish("room.1", {"n": i})
                    assert (await c.recv())["data"] == {"n": i}
            await wait_until_gone(server)
            # 2. a TCP connection dropped without a close frame
            raw = await raw_ws(server)
            await raw.send_json({"type": "subscribe", "channel": "room.1"})
            assert (await raw.recv_json())["type"] == "subscribed"
            await raw.aclose()
            await wait_until_gone(server)
            # 3. a frame the server refuses (a text frame that is not UTF-8: 1007)
            raw = await raw_ws(server)
            await raw.send_frame(OP_TEXT, b"\xff\xfe")
            await raw.read_to_end()
            await raw.aclose()
            await wait_until_gone(server)
            # 4. a slow consumer that does not read, kicked with 4002
            slow = await raw_ws(server, rcvbuf=4096)
            await slow.send_json({"type": "subscribe", "channel": "slow.1"})
            assert (await slow.recv_json())["type"] == "subscribed"
            (slow_conn,) = server.connections.values()
            async with open_client(server) as pub:
                with trio.fail_after(10):
                    i = 0
                    while slow_conn._close is None:  # until it is kicked
                        await pub.publish("slow.1", {"pad": "x" * 30_000, "i": i})
                        i += 1
            assert slow_conn._close[0] == 4002
            del slow_conn
            await slow.aclose()  # (its close frame can never be written: no grace period)
            await wait_until_gone(server)
            assert server_side_garbage() == []
            # 5. connections still open when the server stops (closed with 1001)
            async with open_client(server) as c1, open_client(server) as c2:
                await c1.subscribe("room.2")
                await c2.subscribe("room.2")
                server.stop()
                with trio.fail_after(5):
                    while server.connections:
                        await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert server_side_garbage() == []
