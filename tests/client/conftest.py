"""Helpers for the Python client's tests: real relay servers (in-process and ``python -m relay
serve`` subprocesses), a loopback TCP proxy that records upgrade requests and can freeze or
cut the connections it carries, and an event recorder.

Nothing here imitates the server: every test talks to a real one over loopback.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from relay.client import Event
from relay.config import CONFIG_KEYS, ChannelOptions, Config
from relay.server.app import RelayServer
from relay.server.ws import Connection

REPO = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"relay listening on ws://127\.0\.0\.1:(\d+)/ws")
#: The caller's configuration variables stay out of child processes.
CONFIG_ENV = {"RELAY_CONFIG", "RELAY_TOKEN", "RELAY_URL", *("RELAY_" + key.upper() for key in CONFIG_KEYS)}


def free_port() -> int:
    """A loopback port that was free a moment ago (for servers restarted on the same port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_config(**overrides: Any) -> Config:
    channels = overrides.pop("channels", ())
    overrides.setdefault("port", 0)
    overrides.setdefault("node_id", "test")
    return Config(host="127.0.0.1", channels=tuple(
        c if isinstance(c, ChannelOptions) else ChannelOptions(**c) for c in channels
    ), **overrides)


@asynccontextmanager
async def running_server(**overrides: Any) -> AsyncIterator[RelayServer]:
    """A RelayServer on 127.0.0.1 (port 0 unless given) in its own nursery; stopped on exit."""
    async with trio.open_nursery() as nursery:
        server: RelayServer = await nursery.start(RelayServer(make_config(**overrides)).run)
        try:
            yield server
        finally:
            server.stop()


def connection_of(server: RelayServer, session: str | None) -> Connection:
    """The server's side of the client connection whose welcome said ``session``."""
    assert session is not None
    return server.connections[session]


# --------------------------------------------------------------------------- subprocesses


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


class RelayProcess:
    """``python -m relay serve`` in a child process; output collected as it comes."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.output = ""
        self._more = trio.Event()
        self.closed = False

    async def collect(self) -> None:
        assert self.proc.stdout is not None
        async for chunk in self.proc.stdout:
            self.output += chunk.decode(errors="replace")
            self._more.set()
            self._more = trio.Event()
        self.closed = True
        self._more.set()

    async def wait_listening(self) -> int:
        while (found := LISTENING.search(self.output)) is None:
            assert not self.closed, f"relay exited before listening:\n{self.output}"
            await self._more.wait()
        return int(found.group(1))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)


@asynccontextmanager
async def relay_process(*args: str, cwd: Path | None = None) -> AsyncIterator[RelayProcess]:
    """Run ``python -m relay serve ARGS``; yields once it listens; killed on exit."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay", "serve", *args], cwd=cwd or REPO, env=child_env(),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    relay = RelayProcess(proc)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.collect)
            try:
                await relay.wait_listening()
                yield relay
            finally:
                if proc.returncode is None:
                    proc.kill()
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()


# --------------------------------------------------------------------------- proxy


class Proxy:
    """A loopback TCP proxy in front of a relay server.

    Records the HTTP request head of each connection (to see the client's headers), and
    can ``freeze()`` (stop forwarding without closing: a dead network) or ``cut()`` every
    connection it carries (both TCP connections closed, no WebSocket close frame: the
    client sees 1006).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.heads: list[bytes] = []
        self.frozen = False
        self.is_down = False
        self._thaw = trio.Event()
        self._scopes: set[trio.CancelScope] = set()
        self._new_head = trio.Event()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def authorizations(self) -> list[str | None]:
        """The Authorization header of each connection, in order (None when absent)."""
        found: list[str | None] = []
        for head in self.heads:
            value = None
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, rest = line.partition(":")
                if name.strip().lower() == "authorization":
                    value = rest.strip()
            found.append(value)
        return found

    async def wait_heads(self, count: int) -> None:
        while len(self.heads) < count:
            await self._new_head.wait()

    def freeze(self) -> None:
        self.frozen = True

    def thaw(self) -> None:
        self.frozen = False
        self._thaw.set()
        self._thaw = trio.Event()

    def cut(self) -> None:
        for scope in list(self._scopes):
            scope.cancel()

    def down(self) -> None:
        """Cut every connection and refuse new ones (closed at once): the server looks gone."""
        self.is_down = True
        self.cut()

    def up(self) -> None:
        self.is_down = False

    async def run(self, *, task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.is_down:
            await client.aclose()
            return
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with client, await trio.open_tcp_stream("127.0.0.1", self.target_port) as server:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        chunk = await client.receive_some(65536)
                        if not chunk:
                            return
                        head += chunk
                    self.heads.append(head.partition(b"\r\n\r\n")[0])
                    self._new_head.set()
                    self._new_head = trio.Event()
                    await server.send_all(head)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                        nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # either side went away: the other side sees it too
            finally:
                self._scopes.discard(scope)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            while True:
                data = await src.receive_some(65536)
                if not data:
                    break
                while self.frozen:
                    await self._thaw.wait()
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # one side went away: the pump in the other direction is cancelled below
        finally:
            scope.cancel()


@asynccontextmanager
async def running_proxy(target_port: int) -> AsyncIterator[Proxy]:
    async with trio.open_nursery() as nursery:
        proxy: Proxy = await nursery.start(Proxy(target_port).run)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- events


class Recorder:
    """Collects a client's events (pass ``recorder`` as ``on_event``) and waits for them."""

    def __init__(self) -> None:
        self.events: list[tuple[float, Event]] = []
        self._lot = trio.lowlevel.ParkingLot()

    def __call__(self, event: Event) -> None:
        self.events.append((trio.current_time(), event))
        self._lot.unpark_all()

    def of(self, kind: type) -> list[Any]:
        return [e for _, e in self.events if isinstance(e, kind)]

    def kinds(self) -> list[str]:
        return [type(e).__name__ for _, e in self.events]

    async def wait_for(self, kind: type, count: int = 1,
                       where: Callable[[Any], bool] = lambda e: True) -> Any:
        """Wait until ``count`` events of ``kind`` matching ``where`` were seen; return the last."""
        while True:
            found = [e for e in self.of(kind) if where(e)]
            if len(found) >= count:
                return found[count - 1]
            await self._lot.park()

    async def wait_next(self, after: Any, kind: type) -> Any:
        """Wait for the first event of ``kind`` that came after the event ``after``."""
        while True:
            index = next(i for i, (_, e) in enumerate(self.events) if e is after)
            for _, event in self.events[index + 1:]:
                if isinstance(event, kind):
                    return event
            await self._lot.park()
