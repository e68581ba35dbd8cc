"""Real Redis servers and real ``relay serve`` nodes on them, over loopback.

``redis-server`` must be installed (CI installs Debian's): without it these tests fail,
they never skip. Each Redis runs without persistence on a free port of 127.0.0.1 and
can be killed (SIGKILL) and started again on the same port; each relay node is a
``python -m relay serve`` child process (tests/server/test_subprocess.py).

Note: pytest imports this directory as the package ``redis`` (tests/ is on sys.path), which
shadows redis-py inside the test process. The relay nodes are child processes and use the
real one; in-process tests must not need ``import redis``.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from websockets.trio.client import connect

from client.conftest import free_port
from server.conftest import MSGPACK_PROTO, Client
from server.test_subprocess import RelayProcess, child_env, relay_process

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """A redis-server child process on 127.0.0.1:``port``."""

    def __init__(self, port: int, workdir: Path, *extra: str, tls: bool = False) -> None:
        self.port = port
        self.workdir = workdir
        self.extra = extra
        #: The server speaks TLS on ``port`` (the test's own commands then skip verification).
        self.tls = tls
        #: The test's own commands log in with it first (None: no AUTH).
        self.password: str | None = None
        self.proc: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self, redis_server: str) -> list[str]:
        return [redis_server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no", *self.extra]

    async def start(self) -> None:
        assert REDIS_SERVER is not None, (
            "redis-server is not installed (apt-get install redis-server): the Redis tests need it")
        self.proc = await trio.lowlevel.open_process(
            self.argv(REDIS_SERVER), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with trio.fail_after(10):
            while True:
                assert self.proc.returncode is None, f"redis-server on port {self.port} exited at start"
                try:
                    if await self.command("PING") == "PONG":
                        return
                except (OSError, trio.BrokenResourceError):
                    pass
                await trio.sleep(0.02)

    async def kill(self) -> None:
        """SIGKILL: Redis is gone at once, mid-reply or not."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self.kill()

    async def command(self, *args: str | int) -> Any:
        """One command over a fresh connection; replies parsed by hiredis."""
        return (await self.commands(args))[0]

    async def commands(self, *commands: tuple[str | int, ...]) -> list[Any]:
        """Commands in order over one fresh connection (logged in first with ``password``,
        if set); their replies."""
        if self.password is None:
            return await self._exchange(commands)
        return (await self._exchange((("AUTH", self.password), *commands)))[1:]

    async def _exchange(self, commands: tuple[tuple[str | int, ...], ...]) -> list[Any]:
        import hiredis

        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        if self.tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            stream = trio.SSLStream(stream, ctx)
        async with stream:
            await stream.send_all(b"".join(hiredis.pack_command(tuple(args)) for args in commands))
            reader = hiredis.Reader(encoding="utf-8")
            replies: list[Any] = []
            while len(replies) < len(commands):
                while (reply := reader.gets()) is False:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise OSError("redis closed the connection")
                    reader.feed(data)
                if isinstance(reply, hiredis.ReplyError):
                    raise reply
                replies.append(reply)
            return replies

    async def replicated(self, key: str = "test:replicated") -> None:
        """Return once a replica has every write this master took so far (WAIT counts the
        writes of its own connection: one write first, to ``key``, then WAIT for it)."""
        _, acked = await self.commands(("INCR", key), ("WAIT", 1, 5000))
        assert acked == 1, "the replica did not catch up within 5 s"


class SentinelServer(RedisServer):
    """A Redis Sentinel (``redis-server sentinel.conf --sentinel``, the same binary) that
    watches the master on 127.0.0.1:``master_port`` as ``name``, alone (quorum 1): it fails
    over about 1 s after the master stopped answering (down-after 1000 ms). With ``password``
    its clients must log in (``requirepass``)."""

    def __init__(self, port: int, workdir: Path, master_port: int, name: str, password: str | None = None) -> None:
        super().__init__(port, workdir)
        self.password = password
        self.conf = workdir / f"sentinel-{port}.conf"
        self.conf.write_text(
            f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {workdir}\n"
            f"sentinel monitor {name} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {name} 1000\n"
            f"sentinel failover-timeout {name} 2000\n"
            + (f"requirepass {password}\n" if password else ""))

    def argv(self, redis_server: str) -> list[str]:
        return [redis_server, str(self.conf), "--sentinel"]


@asynccontextmanager
async def redis_server(workdir: Path, port: int | None = None, *extra: str,
                       tls: bool = False) -> AsyncIterator[RedisServer]:
    server = RedisServer(port or free_port(), workdir, *extra, tls=tls)
    try:
        await server.start()
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await server.stop()


@asynccontextmanager
async def relay_nodes(workdir: Path, count: int, *args: str, config: str = "") -> AsyncIterator[list[RelayProcess]]:
    """``count`` relay nodes started with ``args``; yields once every one is ready."""
    if config:
        (workdir / "relay.toml").write_text(config)
        args = (*args, "--config", str(workdir / "relay.toml"))
    async with AsyncExitStack() as stack:
        nodes = []
        for i in range(count):
            node = await stack.enter_async_context(
                relay_process(workdir, "--port", "0", "--node-id", f"node{i}", *args, env=child_env()))
            nodes.append(node)
        for node in nodes:
            await node.started()
        for node in nodes:
            await wait_ready(node)
        yield nodes


async def start_node(workdir: Path, stack: AsyncExitStack, name: str, *args: str) -> RelayProcess:
    node = await stack.enter_async_context(
        relay_process(workdir, "--port", "0", "--node-id", name, *args, env=child_env()))
    await node.started()
    await wait_ready(node)
    return node


async def http(node: RelayProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One HTTP request to a node; a JSON body is decoded, other bodies come back as text."""
    from server.conftest import http_request

    raw = None if body is None else json.dumps(body).encode()
    status, out, headers = await http_request(node, method, path, raw)  # type: ignore[arg-type]
    if headers.get("content-type", "").startswith("application/json"):
        return status, json.loads(out)
    return status, out.decode()


async def publish_once_back(node: RelayProcess, channel: str, data: Any, timeout: float) -> dict[str, Any]:
    """Publish through ``node`` until Redis takes it (after a failover: ``unavailable`` until
    the node reaches the new master); return the answer."""
    with trio.move_on_after(timeout) as waited:
        while True:
            status, body = await http(node, "POST", "/api/publish", {"channel": channel, "data": data})
            if status == 200:
                return body  # type: ignore[no-any-return]
            assert status == 503 and body["error"] == "unavailable", body
            await trio.sleep(0.1)
    raise AssertionError(f"still {body} after {timeout}s\n{node.output[-3000:]}")


async def readyz(node: RelayProcess) -> tuple[int, str]:
    status, body = await http(node, "GET", "/readyz")
    return status, body


async def wait_ready(node: RelayProcess, ready: bool = True, timeout: float = 10) -> str:
    """Wait until the node's /readyz says 200 (or, with ``ready=False``, 503); return its body."""
    with trio.fail_after(timeout):
        while True:
            status, body = await readyz(node)
            if (status == 200) == ready:
                assert status in (200, 503), (status, body)
                return body
            await trio.sleep(0.05)


@asynccontextmanager
async def client(node: RelayProcess, encoding: str = "json") -> AsyncIterator[Client]:
    kwargs: dict[str, Any] = {"subprotocols": [MSGPACK_PROTO]} if encoding == "msgpack" else {}
    async with connect(node.url, **kwargs) as ws:
        c = Client(ws, encoding)
        c.welcome = await c.recv()
        assert c.welcome["type"] == "welcome", c.welcome
        yield c


def cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too."""
    while True:
        port = free_port()
        if port + 10000 <= 65535 and port_is_free(port + 10000):
            return port


def numsub(reply: list[Any]) -> dict[str, int]:
    return {reply[i]: int(reply[i + 1]) for i in range(0, len(reply), 2)}


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@asynccontextmanager
async def redis_cluster(workdir: Path, masters: int = 3, replicas: int = 0) -> AsyncIterator[list[RedisServer]]:
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each, every node in
    its own directory, created with ``redis-cli --cluster create``; yields once every node
    says cluster_state:ok. A master that dies is failed over after about a second."""
    redis_cli = shutil.which("redis-cli")
    assert redis_cli is not None, "redis-cli is not installed (it comes with redis-server)"
    async with AsyncExitStack() as stack:
        nodes = []
        for i in range(masters * (1 + replicas)):
            (workdir / f"cluster{i}").mkdir()
            nodes.append(await stack.enter_async_context(redis_server(
                workdir / f"cluster{i}", cluster_port(), "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000",
                "--cluster-replica-validity-factor", "0", "--repl-diskless-sync-delay", "0")))
        await trio.run_process(
            [redis_cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with trio.fail_after(20):
            for node in nodes:
                while "cluster_state:ok" not in await node.command("CLUSTER", "INFO"):
                    await trio.sleep(0.05)
            for node in nodes:  # every replica has synced with its master
                while True:
                    info = await node.command("INFO", "replication")
                    if "role:master" in info or "master_link_status:up" in info:
                        break
                    await trio.sleep(0.05)
        yield nodes
