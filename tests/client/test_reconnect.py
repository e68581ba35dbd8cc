"""The client across connection losses, against real servers: SIGKILL and restart, drain and
kicks with each close code, token refresh, the offline queue, and the backoff schedule."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import trio

import relay.client._manager as manager_module
from relay.client import (
    Client,
    ClientClosed,
    ClientState,
    Closed,
    Connected,
    Connecting,
    Disconnected,
    Lost,
    Message,
    OfflineQueueFull,
    PublishUnconfirmed,
    Reconnecting,
    RecoveryLost,
    RequestTimeout,
    Subscription,
    backoff_cap,
    connect,
)

from .conftest import (
    Recorder,
    connection_of,
    free_port,
    relay_process,
    running_proxy,
    running_server,
)

FAST = {"min_backoff": 0.01, "max_backoff": 0.05}


class Reader:
    """Reads a subscription in a task, keeping messages and losses in stream order."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.items: list[Message | RecoveryLost] = []
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def messages(self) -> list[Message]:
        return [m for m in self.items if isinstance(m, Message)]

    async def run(self) -> None:
        while True:
            try:
                async for msg in self.sub:
                    assert isinstance(msg, Message)
                    self.items.append(msg)
                    self._lot.unpark_all()
                return
            except RecoveryLost as lost:
                self.items.append(lost)  # and keep reading: the stream goes on

    async def wait_until(self, predicate: Callable[[list[Message]], bool]) -> None:
        while not predicate(self.messages):
            await self._lot.park()


class Publisher:
    """Publishes 0, 1, 2, ... one at a time, keeping the acks; survives losing the connection."""

    def __init__(self, client: Client, channel: str, pause: float = 0.002) -> None:
        self.client = client
        self.channel = channel
        self.pause = pause
        self.acked: dict[tuple[str, int], int] = {}  # (epoch, offset) -> value
        self.unconfirmed: list[int] = []
        self.stop = trio.Event()

    async def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                ack = await self.client.publish(self.channel, i)
                self.acked[(ack.epoch, ack.offset)] = i
            except (PublishUnconfirmed, RequestTimeout):
                self.unconfirmed.append(i)
            i += 1
            await trio.sleep(self.pause)


# --------------------------------------------------------------------------- SIGKILL


async def test_sigkill_and_restart_mid_stream_loses_nothing_it_could_see() -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws"
    rec = Recorder()
    with trio.fail_after(60):
        async with relay_process("--port", str(port), "--node-id", "first") as first, \
                connect(url, on_event=rec, min_backoff=0.02, max_backoff=0.2) as subc, \
                connect(url, min_backoff=0.02, max_backoff=0.2) as pubc, \
                trio.open_nursery() as nursery:
            await subc.wait_connected()
            reader = Reader(await subc.subscribe("feed"))
            publisher = Publisher(pubc, "feed")
            nursery.start_soon(reader.run)
            nursery.start_soon(publisher.run)
            await reader.wait_until(lambda seen: len(seen) >= 30)
            first.kill()  # SIGKILL: no close frames, history gone
            await first.proc.wait()
            await rec.wait_for(Disconnected)
            async with relay_process("--port", str(port), "--node-id", "second"):
                await rec.wait_for(Connected, 2)
                before = len(reader.messages)
                await reader.wait_until(lambda seen: len(seen) >= before + 30)
                publisher.stop.set()
                await reader.wait_until(lambda seen: seen[-1].offset >= max(o for _, o in publisher.acked if _ == seen[-1].epoch))
                # everything acked in the new epoch after the resubscription has arrived
                last_epoch = reader.messages[-1].epoch
                last_acked = max(o for e, o in publisher.acked if e == last_epoch)
                await reader.wait_until(lambda seen: seen[-1].offset >= last_acked)
                nursery.cancel_scope.cancel()

    losses = [i for i, item in enumerate(reader.items) if isinstance(item, RecoveryLost)]
    assert len(losses) == 1, reader.items  # told once, at the point of the loss
    lost = reader.items[losses[0]]
    assert isinstance(lost, RecoveryLost)
    before_msgs = [m for m in reader.items[:losses[0]] if isinstance(m, Message)]
    after_msgs = [m for m in reader.items[losses[0] + 1:] if isinstance(m, Message)]
    e1, e2 = before_msgs[0].epoch, after_msgs[0].epoch
    assert e1 != e2 and lost.new_epoch == e2
    assert {m.epoch for m in before_msgs} == {e1} and {m.epoch for m in after_msgs} == {e2}
    # before the kill: 1..m without a gap or a duplicate; the loss names m
    assert [m.offset for m in before_msgs] == list(range(1, len(before_msgs) + 1))
    assert (lost.old_epoch, lost.old_offset) == (e1, len(before_msgs))
    # after the restart: everything after the offset it resubscribed at, in order
    assert [m.offset for m in after_msgs] == list(range(lost.new_offset + 1, lost.new_offset + 1 + len(after_msgs)))
    # the data is what was published there, each value once and in publishing order
    for m in before_msgs + after_msgs:
        if (m.epoch, m.offset) in publisher.acked:
            assert publisher.acked[(m.epoch, m.offset)] == m.data
    values = [m.data for m in before_msgs + after_msgs]
    assert values == sorted(set(values))
    # every publish acked in the new epoch after the resubscription was delivered
    assert {(e, o) for e, o in publisher.acked if e == e2 and o > lost.new_offset} <= \
        {(m.epoch, m.offset) for m in after_msgs}
    assert [type(e).__name__ for e in rec.of(Lost)] == ["Lost"]


# --------------------------------------------------------------------------- 1001 / drain


async def test_kick_1001_waits_the_hint_and_recovers_exactly_once() -> None:
    rec = Recorder()
    with trio.fail_after(20):
        async with running_server() as server, connect(server.url, on_event=rec, **FAST) as subc, \
                connect(server.url) as pubc, trio.open_nursery() as nursery:
            await subc.wait_connected()
            reader = Reader(await subc.subscribe("feed"))
            publisher = Publisher(pubc, "feed")
            nursery.start_soon(reader.run)
            nursery.start_soon(publisher.run)
            await reader.wait_until(lambda seen: len(seen) >= 20)
            connection_of(server, subc.session).kick(1001, json.dumps({"reconnect_after_ms": 150}))
            await rec.wait_for(Connected, 2)
            before = len(reader.messages)
            await reader.wait_until(lambda seen: len(seen) >= before + 20)
            publisher.stop.set()
            await trio.sleep(0.05)
            last = max(o for _, o in publisher.acked)
            await reader.wait_until(lambda seen: seen[-1].offset >= last)
            nursery.cancel_scope.cancel()
    gone = rec.of(Disconnected)
    assert [(d.code, d.reason) for d in gone] == [(1001, '{"reconnect_after_ms": 150}')]
    (again,) = rec.of(Reconnecting)
    assert 0.15 <= again.delay <= 0.15 + FAST["min_backoff"]
    connects = [t for t, e in rec.events if isinstance(e, Connecting)]
    disconnect_at = next(t for t, e in rec.events if isinstance(e, Disconnected))
    assert connects[1] - disconnect_at >= 0.15
    assert not rec.of(Lost) and all(isinstance(i, Message) for i in reader.items)
    epoch = reader.messages[0].epoch
    assert [m.offset for m in reader.messages] == list(range(1, last + 1))
    assert [m.data for m in reader.messages] == [publisher.acked[(epoch, o)] for o in range(1, last + 1)]
    assert reader.sub.statistics().duplicates == 0


async def test_drain_then_a_new_server_on_the_same_port_is_a_recovery_lost() -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws"
    rec = Recorder()
    with trio.fail_after(20):
        async with connect(url, on_event=rec, **FAST) as c:
            async with running_server(port=port, drain_window=0.3) as first:
                sub = await c.subscribe("d")
                await c.wait_connected()
                ack = await c.publish("d", "old")
                assert (await sub.__anext__()).data == "old"
                await first.drain()
            gone = await rec.wait_for(Disconnected, where=lambda d: d.code is not None)
            assert gone.code == 1001
            hint = json.loads(gone.reason)["reconnect_after_ms"] / 1000
            again = await rec.wait_next(gone, Reconnecting)
            assert hint <= again.delay <= hint + FAST["min_backoff"]
            async with running_server(port=port):
                await rec.wait_for(Connected, 2)
                with pytest.raises(RecoveryLost) as info:
                    await sub.__anext__()
                lost = info.value
                assert (lost.channel, lost.old_epoch, lost.old_offset) == ("d", ack.epoch, 1)
                assert lost.new_epoch != ack.epoch and lost.new_offset == 0
                new = await c.publish("d", "new")
                assert await sub.__anext__() == Message("d", 1, "new", new.epoch)


# --------------------------------------------------------------------------- 4002


async def test_kick_4002_reconnects_and_recovers() -> None:
    rec = Recorder()
    with trio.fail_after(10):
        async with running_server() as server, connect(server.url, on_event=rec, **FAST) as c, \
                connect(server.url) as pub:
            sub = await c.subscribe("s")
            await sub.wait_subscribed()  # (connected is not enough: pub is another client)
            await pub.publish("s", 1)
            connection_of(server, c.session).kick(4002, "slow consumer: send queue overflowed")
            for i in range(2, 6):  # published while the subscriber is away
                await pub.publish("s", i)
            await rec.wait_for(Connected, 2)
            await pub.publish("s", 6)
            assert [(await sub.__anext__()).data for _ in range(6)] == [1, 2, 3, 4, 5, 6]
            assert rec.of(Disconnected)[0].code == 4002 and not rec.of(Lost)


async def test_real_slow_consumer_overflow_reconnects_and_recovers_everything() -> None:
    payload = "x" * 8192
    n = 400
    rec = Recorder()
    with trio.fail_after(60):
        async with running_server(send_queue_size=65536, max_message_size=16384,
                                  channels=[{"pattern": "*", "history_size": n}]) as server, \
                connect(server.url, on_event=rec, buffer_size=1, **FAST) as c:
            sub = await c.subscribe("big")
            await sub.wait_subscribed()
            got: list[int] = []
            async with trio.open_nursery() as nursery:
                async def publish_all() -> None:
                    for i in range(1, n + 1):  # 16 x 8 KiB per scheduling pass: the 64 KiB queue overflows
                        server.hub.publish("big", {"i": i, "pad": payload}, trio.current_time())
                        if i % 16 == 0:
                            await trio.sleep(0.001)
                nursery.start_soon(publish_all)
                while len(got) < n:
                    got.append((await sub.__anext__()).data["i"])
            assert got == list(range(1, n + 1))
            codes = [d.code for d in rec.of(Disconnected)]
            assert 4002 in codes, codes
            assert not rec.of(Lost)


# --------------------------------------------------------------------------- no reconnect


@pytest.mark.parametrize(("code", "reason"), [(1000, "bye"), (1008, "forbidden origin")])
async def test_1000_and_1008_end_the_client_without_reconnecting(code: int, reason: str) -> None:
    rec = Recorder()
    with trio.fail_after(10):
        async with running_server() as server, connect(server.url, on_event=rec, **FAST) as c:
            sub = await c.subscribe("a")
            await c.wait_connected()
            ack = await c.publish("a", 1)
            connection_of(server, c.session).kick(code, reason)
            assert await sub.__anext__() == Message("a", 1, 1, ack.epoch)  # what arrived still comes
            with pytest.raises(ClientClosed) as info:
                await sub.__anext__()
            assert (info.value.code, info.value.reason) == (code, reason)
            assert str(code) in str(info.value) and "not reconnecting" in str(info.value)
            with pytest.raises(ClientClosed):
                await c.publish("a", 2)
            with pytest.raises(ClientClosed):
                c.publish_nowait("a", 2)
            with pytest.raises(ClientClosed):
                await c.wait_connected()
            assert c.state is ClientState.CLOSED
            await trio.sleep(0.2)
            assert not server.connections  # and it did not come back
    assert rec.kinds() == ["Connecting", "Connected", "Subscribed", "Disconnected", "Closed"]
    closed = rec.of(Closed)[0]
    assert closed.error is not None and closed.error.code == code


async def test_closed_client_error_escapes_the_async_with_unwrapped() -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            with pytest.raises(ClientClosed):
                async with connect(server.url) as c:
                    await c.wait_connected()
                    connection_of(server, c.session).kick(1008, "policy")
                    sub = await c.subscribe("x")
                    async for _ in sub:
                        pass  # pragma: no cover


async def test_handshake_refused_with_404_ends_the_client() -> None:
    rec = Recorder()
    with trio.fail_after(10):
        async with running_server() as server:
            url = f"ws://127.0.0.1:{server.port}/not-ws"
            async with connect(url, on_event=rec, **FAST) as c:
                with pytest.raises(ClientClosed) as info:
                    await c.wait_connected()
    assert info.value.http_status == 404 and "404" in str(info.value)
    assert rec.kinds() == ["Connecting", "Disconnected", "Closed"]


# --------------------------------------------------------------------------- 4001


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_4001_gets_a_new_token_before_reconnecting(kind: str) -> None:
    rec = Recorder()
    tokens = iter(["tok-2", "tok-3"])
    calls: list[tuple[float, int]] = []

    def next_token() -> str:
        calls.append((trio.current_time(), len(rec.of(Connecting))))
        return next(tokens)

    async def next_token_async() -> str:
        await trio.sleep(0.01)
        return next_token()

    callback: Any = next_token_async if kind == "async" else next_token
    with trio.fail_after(10):
        async with running_server() as server, running_proxy(server.port) as proxy, \
                connect(proxy.url, token="tok-1", token_callback=callback, on_event=rec, **FAST) as c:
            sub = await c.subscribe("t")
            await c.wait_connected()
            connection_of(server, c.session).kick(4001, "token expired")
            await rec.wait_for(Connected, 2)
            ack = await c.publish("t", "after")
            assert await sub.__anext__() == Message("t", 1, "after", ack.epoch)
            assert proxy.authorizations() == ["Bearer tok-1", "Bearer tok-2"]
    assert len(calls) == 1 and calls[0][1] == 1  # called once, before the second connection
    assert rec.of(Disconnected)[0].code == 4001


async def test_4001_without_a_token_callback_ends_the_client() -> None:
    with trio.fail_after(10):
        async with running_server() as server, running_proxy(server.port) as proxy, \
                connect(proxy.url, token="tok-1", **FAST) as c:
            sub = await c.subscribe("t")
            await c.wait_connected()
            connection_of(server, c.session).kick(4001, "token expired")
            with pytest.raises(ClientClosed, match="token_callback") as info:
                await sub.__anext__()
            assert info.value.code == 4001
            assert len(proxy.heads) == 1


async def test_failing_token_callback_ends_the_client_with_its_error() -> None:
    def broken() -> str:
        raise LookupError("auth service down")

    rec = Recorder()
    with trio.fail_after(10):
        async with running_server() as server, \
                connect(server.url, token_callback=broken, on_event=rec, **FAST) as c:
            await c.wait_connected()
            connection_of(server, c.session).kick(4001, "token expired")
            closed = await rec.wait_for(Closed)
            with pytest.raises(ClientClosed, match="auth service down"):
                await c.wait_connected()
    assert closed.error is not None and isinstance(closed.error.__cause__, LookupError)
    assert closed.error.code == 4001


# --------------------------------------------------------------------------- offline queue


async def test_offline_publishes_go_out_in_order_after_reconnecting_and_overflow_raises() -> None:
    rec = Recorder()
    with trio.fail_after(20):
        async with running_server() as server, running_proxy(server.port) as proxy, \
                connect(proxy.url, max_offline_queue=6, on_event=rec, **FAST) as c:
            await c.wait_connected()
            proxy.down()  # the server is unreachable: connection lost, new ones refused
            await rec.wait_for(Disconnected, where=lambda d: d.code == 1006)
            await rec.wait_for(Reconnecting, 2)
            assert c.state is not ClientState.CONNECTED
            pending = [c.publish_nowait("q", i) for i in range(5)]
            with trio.move_on_after(0.1):  # cancelled while queued: withdrawn, never sent
                await c.publish("q", "withdrawn")
            pending.append(c.publish_nowait("q", 5))
            with pytest.raises(OfflineQueueFull, match="max_offline_queue=6") as info:
                c.publish_nowait("q", "overflow")
            assert info.value.limit == 6
            with pytest.raises(OfflineQueueFull):
                await c.publish("q", "overflow")
            assert c.statistics().queued_publishes == 6
            assert "q" not in {ch.name for ch in server.hub}  # nothing got through meanwhile
            proxy.up()
            acks = [await p.wait_ack() for p in pending]
            assert [a.offset for a in acks] == [1, 2, 3, 4, 5, 6]
            _, retained = server.hub.history("q", trio.current_time(), None, None)  # type: ignore[misc]
            assert [p.data for p in retained] == [0, 1, 2, 3, 4, 5]
            assert c.statistics().queued_publishes == 0


async def test_publish_in_flight_when_the_connection_drops_is_unconfirmed_not_resent() -> None:
    rec = Recorder()
    with trio.fail_after(10):
        async with running_server() as server, running_proxy(server.port) as proxy, \
                connect(proxy.url, on_event=rec, **FAST) as c:
            await c.wait_connected()
            proxy.freeze()
            async with trio.open_nursery() as nursery:
                outcome: list[BaseException] = []

                async def publish() -> None:
                    try:
                        await c.publish("u", "maybe")
                    except PublishUnconfirmed as exc:
                        outcome.append(exc)
                nursery.start_soon(publish)
                while c.statistics().pending_requests == 0:
                    await trio.sleep(0.01)
                proxy.cut()
                proxy.thaw()
            (error,) = outcome
            assert isinstance(error, PublishUnconfirmed) and error.channel == "u" and error.code == 1006
            await rec.wait_for(Connected, 2)
            ack = await c.publish("u", "sure")
            assert ack.offset == 1  # "maybe" never reached the server, and was not resent


# --------------------------------------------------------------------------- backoff


async def test_backoff_schedule_against_a_port_where_nothing_listens(autojump_clock: Any) -> None:
    rec = Recorder()
    url = f"ws://127.0.0.1:{free_port()}/ws"
    with trio.fail_after(10_000):
        async with connect(url, min_backoff=0.5, max_backoff=8.0, backoff_factor=2.0, on_event=rec) as c:
            await rec.wait_for(Connecting, 13)
            assert c.state is ClientState.CONNECTING
    again = rec.of(Reconnecting)
    assert [r.attempt for r in again] == list(range(1, 13))
    for r in again:
        assert 0 <= r.delay <= backoff_cap(r.attempt, min_backoff=0.5, max_backoff=8.0, factor=2.0)
    assert len({r.delay for r in again}) == len(again)  # jittered
    # each attempt starts exactly `delay` after it was announced (virtual time)
    announced = [t for t, e in rec.events if isinstance(e, Reconnecting)]
    started = [t for t, e in rec.events if isinstance(e, Connecting)][1:]
    assert [round(s - a, 9) for a, s in zip(announced, started)] == [round(r.delay, 9) for r in again]
    assert all(d.code is None and d.reason.startswith("cannot connect") for d in rec.of(Disconnected))


@pytest.mark.parametrize(("code", "reason", "delay"), [
    (1011, "internal error", 0.01),        # cap of attempt 1
    (1013, "try again later", 0.08),       # longer: 3 doublings further
    (4003, "rate limited", 0.08),
    (1001, '{"reconnect_after_ms": 30}', 0.04),  # the hint plus at most min_backoff
], ids=["1011", "1013", "4003", "1001-hint"])
async def test_delay_per_close_code(monkeypatch: pytest.MonkeyPatch, code: int, reason: str,
                                    delay: float) -> None:
    monkeypatch.setattr(manager_module, "_rand", lambda: 1.0)  # delays at their maximum
    rec = Recorder()
    with trio.fail_after(10):
        async with running_server() as server, \
                connect(server.url, min_backoff=0.01, max_backoff=1.0, on_event=rec) as c:
            await c.wait_connected()
            connection_of(server, c.session).kick(code, reason)
            await rec.wait_for(Connected, 2)
    (again,) = rec.of(Reconnecting)
    assert again.attempt == 1 and again.delay == pytest.approx(delay)
    assert rec.of(Disconnected)[0].code == code


async def test_server_started_late_is_found() -> None:
    port = free_port()
    rec = Recorder()
    with trio.fail_after(10):
        async with connect(f"ws://127.0.0.1:{port}/ws", on_event=rec, **FAST) as c:
            sub = await c.subscribe("late")
            await rec.wait_for(Reconnecting, 3)
            async with running_server(port=port):
                ack = await c.publish("late", 1)  # queued until connected
                assert await sub.__anext__() == Message("late", 1, 1, ack.epoch)
