"""Slow consumers: a subscriber that does not read never makes anything grow without bound,
and never slows down or starves the other subscribers of the same channel.

A "slow reader" is a raw socket whose receive buffer is shrunk before connecting, so the
server's writes to it stall once the server's own socket send buffer is full; or a
trio-websocket client over such a socket with ``message_queue_size=1`` that does not call
``get_message`` for a while. The kernel's loopback buffers are large, so the publisher sends
a multiple of the largest send buffer the kernel may give the server's socket.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket

from relay.server.app import RelayServer

from .conftest import Client, open_client, running_server
from .test_bad_input import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawSocket, http_request, raw_ws

SEND_QUEUE = 64 * 1024
MAX_MESSAGE = 16 * 1024
PAYLOAD = 8 * 1024  # bytes of data per published message
SMALL_RCVBUF = 4096


def _publish_budget() -> int:
    """Bytes to publish so a stalled subscriber's queue surely overflows.

    The server's socket can buffer up to tcp_wmem's maximum (autotuned); on top of that
    come the client's (shrunk) receive buffer and the send queue itself.
    """
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            wmem_max = int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        wmem_max = 4 * 1024 * 1024
    return 2 * wmem_max + 2 * 1024 * 1024


N_MESSAGES = _publish_budget() // PAYLOAD


def _data(i: int) -> dict[str, Any]:
    return {"n": i, "pad": "x" * PAYLOAD}


async def _metric(server: RelayServer, name: str, labels: str) -> float:
    response = await http_request(server, "GET", "/metrics")
    assert response.status == 200, response
    pattern = re.compile(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", re.MULTILINE)
    found = pattern.search(response.body.decode())
    return float(found.group(1)) if found else 0.0


async def _publish_all(pub: Client, channel: str, n: int) -> None:
    """Publish ``n`` messages, each acknowledged before the next (the publisher never stalls)."""
    for i in range(1, n + 1):
        ack = await pub.publish(channel, _data(i), ref=i)
        assert ack["offset"] == i, ack


async def _read_all_in_order(sub: Client, channel: str, n: int) -> None:
    """A normal subscriber receives offsets 1..n, in order, without gaps."""
    for i in range(1, n + 1):
        msg = await sub.recv(timeout=30)
        assert msg["type"] == "message" and msg["channel"] == channel, {k: msg.get(k) for k in ("type", "offset")}
        assert msg["offset"] == i and msg["data"]["n"] == i, (i, msg["offset"])


@contextlib.asynccontextmanager
async def _fast_subscriber(server: RelayServer, channel: str, n: int) -> AsyncIterator[trio.Event]:
    """A subscriber that keeps reading; the event is set once it has all ``n`` messages."""
    done = trio.Event()
    async with open_client(server, max_queue=None) as sub, trio.open_nursery() as nursery:
        await sub.subscribe(channel)

        async def read() -> None:
            await _read_all_in_order(sub, channel, n)
            done.set()

        nursery.start_soon(read)
        yield done
        with trio.fail_after(30):
            await done.wait()
        # and it is still connected and answered
        assert await sub.request({"type": "ping", "ref": "fast"}) == {"type": "pong", "ref": "fast"}


def _masked_text(message: dict[str, Any]) -> bytes:
    """One masked client text frame (all-zero mask: the payload goes out as is)."""
    payload = json.dumps(message).encode()
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    elif n < 0x10000:
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


async def _stalled_raw_subscriber(server: RelayServer, channel: str) -> RawSocket:
    raw = await raw_ws(server, rcvbuf=SMALL_RCVBUF)
    await raw.send_json({"type": "subscribe", "channel": channel, "ref": "slow"})
    answer = await raw.recv_json()
    assert answer["type"] == "subscribed" and answer["ref"] == "slow", answer
    return raw


async def test_stalled_subscriber_on_disconnect_channel_is_closed_others_get_everything() -> None:
    channel = "stream.ticks"
    with trio.fail_after(90):
        async with running_server(send_queue_size=SEND_QUEUE, max_message_size=MAX_MESSAGE, channels=[
            {"pattern": "stream.*", "mode": "stream", "slow_consumer": "disconnect"},
        ]) as server:
            slow = await _stalled_raw_subscriber(server, channel)
            try:
                async with _fast_subscriber(server, channel, N_MESSAGES), open_client(server) as pub:
                    await _publish_all(pub, channel, N_MESSAGES)
                # Now read what the stalled subscriber was sent: a prefix of the stream,
                # then a 4002 close or a dropped TCP connection.
                offsets: list[int] = []
                closes: list[int | None] = []
                while (frame := await slow.recv_frame()) is not None:
                    if frame.opcode == OP_TEXT:
                        msg = frame.json()
                        assert msg["type"] == "message", msg
                        offsets.append(msg["offset"])
                    elif frame.opcode == OP_CLOSE:
                        closes.append(frame.close_code)
                        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                            await slow.send_close(frame.close_code or 1000)
                    elif frame.opcode == OP_PING:
                        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                            await slow.send_frame(OP_PONG, frame.payload)
            finally:
                await slow.aclose()
            assert slow.end in ("eof", "reset")
            assert closes in ([], [4002]), closes
            assert offsets == list(range(1, len(offsets) + 1)), "the prefix it got has a gap"
            assert len(offsets) < N_MESSAGES, "the stalled subscriber was never cut off"
            assert await _metric(server, "relay_slow_consumer_actions_total", 'action="disconnect"') == 1
            # the server is fine afterwards
            async with open_client(server) as c:
                assert (await c.subscribe(channel))["offset"] == N_MESSAGES


async def test_stalled_subscriber_on_drop_channel_gets_gaps_and_stays() -> None:
    channel = "drop.prices"
    rounds, per_round = 3, N_MESSAGES // 2
    total = rounds * per_round
    with trio.fail_after(120):
        async with running_server(send_queue_size=SEND_QUEUE, max_message_size=MAX_MESSAGE, channels=[
            {"pattern": "drop.*", "mode": "stream", "slow_consumer": "drop"},
        ]) as server:
            slow = await _stalled_raw_subscriber(server, channel)
            try:
                async with _fast_subscriber(server, channel, total), open_client(server) as pub:
                    # Each round: the slow subscriber stalls while a round is published, then
                    # reads until it has caught up. Messages and gaps together cover every
                    # offset exactly once, in order.
                    expected, gaps, received = 1, [], 0
                    for r in range(1, rounds + 1):
                        for i in range(expected, r * per_round + 1):
                            assert (await pub.publish(channel, _data(i), ref=i))["offset"] == i
                        while expected <= r * per_round:
                            msg = await slow.recv_json()
                            assert msg["channel"] == channel, msg
                            if msg["type"] == "message":
                                assert msg["offset"] == expected, (msg["offset"], expected, gaps)
                                assert msg["data"]["n"] == expected
                                expected += 1
                                received += 1
                            else:
                                assert msg["type"] == "gap", msg
                                assert msg["from"] == expected <= msg["to"] <= r * per_round, (msg, expected)
                                gaps.append((msg["from"], msg["to"]))
                                expected = msg["to"] + 1
                assert expected == total + 1
                assert gaps, "the stalled subscriber never fell behind; publish more"
                assert received > 0
                # the connection stays open and the subscription stays
                await slow.send_json({"type": "ping", "ref": "after"})
                assert await slow.recv_json() == {"type": "pong", "ref": "after"}
                async with open_client(server) as pub:
                    await pub.publish(channel, _data(total + 1), ref="last")
                msg = await slow.recv_json()
                assert msg["type"] == "message" and msg["offset"] == total + 1, msg["type"]
            finally:
                await slow.aclose()
            assert await _metric(server, "relay_slow_consumer_actions_total", 'action="drop"') >= len(gaps)
            assert await _metric(server, "relay_slow_consumer_actions_total", 'action="disconnect"') == 0


@pytest.mark.parametrize("mode_options", [
    {"mode": "state"},  # conflate is the default for state channels
    {"mode": "stream", "slow_consumer": "conflate"},
], ids=["state", "stream-conflate"])
async def test_stalled_subscriber_on_conflating_channel_ends_with_the_latest_value(
        mode_options: dict[str, Any]) -> None:
    channel = "state.game"
    with trio.fail_after(90):
        async with running_server(send_queue_size=SEND_QUEUE, max_message_size=MAX_MESSAGE, channels=[
            {"pattern": "state.*", **mode_options},
        ]) as server, trio.open_nursery() as nursery:
            # trio-websocket over a socket with a shrunk receive buffer, holding one message
            raw = await RawSocket.open(server.port, rcvbuf=SMALL_RCVBUF)
            ws = await trio_websocket.wrap_client_stream(
                nursery, raw.stream, "127.0.0.1", "/ws", message_queue_size=1)
            try:
                assert json.loads(await ws.get_message())["type"] == "welcome"
                await ws.send_message(json.dumps({"type": "subscribe", "channel": channel, "ref": 1}))
                assert json.loads(await ws.get_message())["type"] == "subscribed"
                async with open_client(server) as pub:
                    await _publish_all(pub, channel, N_MESSAGES)
                # Resume reading: strictly newer offsets only, ending with the last one.
                offsets: list[int] = []
                while not offsets or offsets[-1] < N_MESSAGES:
                    msg = json.loads(await ws.get_message())
                    assert msg["type"] == "message", msg["type"]
                    assert not offsets or msg["offset"] > offsets[-1], (offsets[-3:], msg["offset"])
                    assert msg["data"]["n"] == msg["offset"]
                    offsets.append(msg["offset"])
                assert offsets[-1] == N_MESSAGES
                assert len(offsets) < N_MESSAGES, "nothing was conflated; publish more"
                # the connection stays open
                await ws.send_message(json.dumps({"type": "ping", "ref": 2}))
                assert json.loads(await ws.get_message()) == {"type": "pong", "ref": 2}
            finally:
                await ws.aclose()
            assert await _metric(server, "relay_slow_consumer_actions_total", 'action="disconnect"') == 0
            nursery.cancel_scope.cancel()


async def test_conflation_is_counted_in_the_slow_consumer_metric() -> None:
    # relay_slow_consumer_actions_total documents the actions disconnect, drop and conflate.
    channel = "state.counted"
    with trio.fail_after(90):
        async with running_server(send_queue_size=SEND_QUEUE, max_message_size=MAX_MESSAGE, channels=[
            {"pattern": "state.*", "mode": "state"},
        ]) as server:
            slow = await _stalled_raw_subscriber(server, channel)
            try:
                async with open_client(server) as pub:
                    await _publish_all(pub, channel, N_MESSAGES)
                received = 0
                while True:
                    msg = await slow.recv_json()
                    received += 1
                    if msg["offset"] == N_MESSAGES:
                        break
            finally:
                await slow.aclose()
            assert received < N_MESSAGES, "nothing was conflated; publish more"
            assert await _metric(server, "relay_slow_consumer_actions_total", 'action="conflate"') > 0


def _queued_bytes(server: RelayServer) -> int:
    """The largest send queue of any open connection (bytes the server holds for it)."""
    return max((conn.outbox.size for conn in server.connections.values()), default=0)


@pytest.mark.parametrize("flood", ["pings", "recoveries"])
async def test_stalled_client_flooding_requests_cannot_grow_its_queue_without_bound(flood: str) -> None:
    # A client that sends requests but never reads the answers: direct answers (pong,
    # subscribed, recovered history) bypass the slow-consumer policy, which is right for
    # one answer, but the queue must not grow with every request. The server may stop
    # reading from such a client (backpressure) or close it (4002); what it must not do is
    # hold an unbounded backlog. The flood below would queue many megabytes if it did.
    channel = "flood.history"
    history = 64  # messages of PAYLOAD bytes: one recovery is about 512 KiB
    with trio.fail_after(90):
        async with running_server(send_queue_size=SEND_QUEUE, max_message_size=MAX_MESSAGE, channels=[
            {"pattern": "flood.*", "history_size": history},
        ]) as server:
            async with open_client(server) as pub:
                for i in range(1, history + 1):
                    epoch = (await pub.publish(channel, _data(i), ref=i))["epoch"]
            slow = await raw_ws(server, rcvbuf=SMALL_RCVBUF)
            if flood == "pings":
                one = _masked_text({"type": "ping", "ref": "p" * 200})
                burst, one_answer = one * 20_000, 230  # about 4.5 MiB of pongs
            else:
                one = _masked_text({"type": "subscribe", "channel": channel,
                                    "since": {"epoch": epoch, "offset": 0}})
                one += _masked_text({"type": "unsubscribe", "channel": channel})
                burst, one_answer = one * 20, history * (PAYLOAD + 64)  # about 10 MiB of history

            async def flood_the_server() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await slow.send(burst)

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(flood_the_server)
                    # Let the server process everything it is willing to read (an event, not
                    # a sleep: every task, server and client, is blocked on I/O).
                    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                    queued = _queued_bytes(server)
                    nursery.cancel_scope.cancel()
            finally:
                await slow.aclose()
            assert queued <= SEND_QUEUE + one_answer, f"{queued:,} bytes queued for a client that does not read"
