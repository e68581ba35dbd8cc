"""A rolling restart behind the shipped proxy configurations loses nothing.

Redis, two ``relay serve`` nodes and Debian's nginx (deploy/nginx/relay.conf) or HAProxy
(deploy/haproxy/relay.cfg), as shipped but for the ports, all on loopback. A few hundred
clients (relay's own Python client) subscribe through the proxy while a publisher publishes
through it continuously; node A is restarted (SIGTERM: drain), then node B. Every client must
end up with exactly the channel's history (Redis', the one order), once each and in order,
and the drained clients' reconnections must spread over the drain window. CI installs nginx,
haproxy and redis-server: a missing one fails, it does not skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import relay.client
from client.conftest import free_port
from redis.conftest import http, redis_server, wait_ready  # type: ignore[import-not-found]
from server.test_subprocess import RelayProcess, child_env, relay_process

REPO = Path(__file__).resolve().parents[2]
#: Clients through the proxy (RELAY_DEPLOY_CLIENTS to try more or fewer).
CLIENTS = int(os.environ.get("RELAY_DEPLOY_CLIENTS", "200"))
CHANNEL = "deploy.feed"
DRAIN_WINDOW = 2.0
PUBLISH_EVERY = 0.05  # 20 messages/s to each of 200 clients: the test process keeps up


def _render(kind: str, listen: int, nodes: list[int], workdir: Path) -> list[str]:
    """Write the shipped proxy configuration with our ports; return the command to run it."""
    if kind == "nginx":
        site = (REPO / "deploy/nginx/relay.conf").read_text()
        site = re.sub(r"listen 80;", f"listen 127.0.0.1:{listen};", site, count=1)
        ports = iter(nodes)
        site = re.sub(r"server 127\.0\.0\.1:870\d", lambda _: f"server 127.0.0.1:{next(ports)}", site)
        (workdir / "relay.conf").write_text(site)
        temp = "\n".join(f"  {name}_temp_path {workdir}/{name};" for name in
                         ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (workdir / "nginx.conf").write_text(
            f"worker_processes 1;\nerror_log {workdir}/nginx-error.log warn;\npid {workdir}/nginx.pid;\n"
            + ("user root;\n" if _is_root() else "")
            + "events { worker_connections 4096; }\n"
            + f"http {{\n  access_log off;\n{temp}\n  include {workdir}/relay.conf;\n}}\n")
        return [_binary("nginx"), "-p", str(workdir), "-c", str(workdir / "nginx.conf"),
                "-g", "daemon off;"]
    cfg = (REPO / "deploy/haproxy/relay.cfg").read_text()
    cfg = cfg.replace("bind 127.0.0.1:80", f"bind 127.0.0.1:{listen}", 1)
    ports = iter(nodes)
    cfg = re.sub(r"127\.0\.0\.1:870\d", lambda _: f"127.0.0.1:{next(ports)}", cfg)
    (workdir / "haproxy.cfg").write_text(cfg)
    return [_binary("haproxy"), "-db", "-f", str(workdir / "haproxy.cfg")]


def _binary(name: str) -> str:
    """The proxy's executable ('' when missing); Debian puts them in /usr/sbin."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    return found or ""


def _is_root() -> bool:
    return os.geteuid() == 0


@asynccontextmanager
async def _proxy(kind: str, listen: int, nodes: list[int], workdir: Path) -> AsyncIterator[None]:
    assert _binary(kind), f"{kind} is not installed (apt-get install -y {kind}); CI installs it"
    cmd = _render(kind, listen, nodes, workdir)
    log = open(workdir / f"{kind}.log", "wb")  # noqa: SIM115 (closed below)
    proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        with trio.fail_after(10):
            while True:
                assert proc.returncode is None, f"{kind} exited at start ({cmd})"
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", listen)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                break
        yield
    finally:
        proc.terminate()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
        log.close()


async def _both_nodes_behind(listen: int) -> None:
    """Wait until the proxy routes to both nodes (HAProxy's health checks need a moment)."""
    from server.conftest import http_request

    class _Proxy:
        port = listen

    seen: set[str] = set()
    with trio.fail_after(15):
        while len(seen) < 2:
            status, body, _ = await http_request(_Proxy(), "GET", "/stats")  # type: ignore[arg-type]
            if status == 200:
                seen.add(json.loads(body)["node"])
            await trio.sleep(0.05)


class Node:
    """One relay node on a fixed port, restartable."""

    def __init__(self, name: str, port: int, args: list[str], workdir: Path) -> None:
        self.name, self.port, self.args, self.workdir = name, port, args, workdir
        self.process: RelayProcess | None = None
        self._stopped = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with relay_process(self.workdir, "--port", str(self.port), "--node-id", self.name,
                                 *self.args, env=child_env()) as proc:
            self.process = proc
            await proc.started()
            await wait_ready(proc)
            task_status.started()
            await proc.proc.wait()  # until SIGTERM ends it

    async def drain(self) -> None:
        assert self.process is not None
        self.process.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            code = await self.process.proc.wait()
        assert code == 0, self.process.output[-2000:]


@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
async def test_rolling_restart_behind_the_proxy_loses_and_duplicates_nothing(tmp_path: Path, kind: str) -> None:
    ports = [free_port(), free_port()]
    listen = free_port()
    (tmp_path / "relay.toml").write_text(
        f"drain_window = {DRAIN_WINDOW}\ndrain_timeout = 10\ntrusted_proxies = [\"127.0.0.1\"]\n"
        "[limits]\nmessages_per_second = 0\nbytes_per_second = 0\nmax_connections_per_ip = 0\n"
        f"[[channels]]\npattern = \"deploy.*\"\nhistory_size = 20000\nhistory_ttl = 600\n")
    received: list[list[tuple[int, Any]]] = [[] for _ in range(CLIENTS)]
    connected_at: list[list[tuple[float, str]]] = [[] for _ in range(CLIENTS)]
    lost: list[Any] = []
    unconfirmed = 0
    drains: dict[str, float] = {}

    with trio.fail_after(150):
        async with redis_server(tmp_path) as redis, trio.open_nursery() as nursery:
            args = ["--redis-url", redis.url, "--config", str(tmp_path / "relay.toml")]
            nodes = [Node("a", ports[0], args, tmp_path), Node("b", ports[1], args, tmp_path)]
            for node in nodes:
                await nursery.start(node.run)
            async with _proxy(kind, listen, ports, tmp_path):
                await _both_nodes_behind(listen)
                url = f"ws://127.0.0.1:{listen}/ws"
                all_subscribed = trio.Event()
                subscribed = 0

                async def subscriber(i: int) -> None:
                    def on_event(event: Any) -> None:
                        nonlocal subscribed
                        if isinstance(event, relay.client.Connected):
                            connected_at[i].append((trio.current_time(), event.node))
                        elif isinstance(event, relay.client.Lost):
                            lost.append(event)
                        elif isinstance(event, relay.client.Subscribed) and len(connected_at[i]) == 1:
                            # the server confirmed the first subscription: from here on
                            # every message of the channel is this client's to receive
                            subscribed += 1
                            if subscribed == CLIENTS:
                                all_subscribed.set()

                    async with relay.client.connect(url, on_event=on_event, max_backoff=1.0) as c:
                        messages = await c.subscribe(CHANNEL)
                        async for msg in messages:
                            received[i].append((msg.offset, msg.data))

                async with trio.open_nursery() as clients:
                    for i in range(CLIENTS):
                        clients.start_soon(subscriber, i)
                    await all_subscribed.wait()
                    published = 0
                    stop_publishing = trio.Event()

                    async def publisher() -> None:
                        nonlocal published, unconfirmed
                        async with relay.client.connect(url, max_backoff=1.0) as pub:
                            while not stop_publishing.is_set():
                                try:
                                    await pub.publish(CHANNEL, {"seq": published})
                                except relay.client.PublishUnconfirmed:
                                    unconfirmed += 1
                                published += 1
                                await trio.sleep(PUBLISH_EVERY)

                    async with trio.open_nursery() as pubs:
                        pubs.start_soon(publisher)
                        await trio.sleep(1.0)
                        for node in nodes:  # the rolling restart: A, then B
                            drains[node.name] = trio.current_time()
                            await node.drain()
                            await nursery.start(node.run)
                            await trio.sleep(DRAIN_WINDOW + 1.0)  # everyone is back before the next
                        stop_publishing.set()
                    # the channel's one order, from Redis (either node answers the same)
                    status, body = await http(nodes[0].process, "GET",
                                              f"/api/channels/{CHANNEL}/history?limit=20000")
                    assert status == 200, body
                    history = [(p["offset"], p["data"]) for p in body["publications"]]
                    with trio.move_on_after(30):
                        while any(len(r) < len(history) for r in received):
                            await trio.sleep(0.1)
                    short = [(i, len(r)) for i, r in enumerate(received) if len(r) < len(history)]
                    assert not short, (f"{len(short)} clients short of {len(history)} messages: {short[:5]}; "
                                       f"first missing of client {short[0][0]}: "
                                       f"{next((h for h, g in zip(history, received[short[0][0]]) if h != g), history[len(received[short[0][0]])] if len(received[short[0][0]]) < len(history) else None)}; "
                                       f"lost={lost[:3]} connects={connected_at[short[0][0]]} "
                                       f"got={received[short[0][0]][:3]} history={history[:3]}")
                    clients.cancel_scope.cancel()
            for node in nodes:
                assert node.process is not None
                node.process.proc.send_signal(signal.SIGTERM)
            nursery.cancel_scope.cancel()

    assert len(history) >= published - unconfirmed > 50, (len(history), published, unconfirmed)
    assert [d["seq"] for _, d in history] == sorted(d["seq"] for _, d in history)  # publisher order kept
    for i, got in enumerate(received):
        assert got == history, (f"client {i}: {len(got)} messages, history {len(history)}; "
                                f"got {got[:3]}, history {history[:3]}")
    assert not lost, lost[:3]
    # Reconnections after each drain: spread over the drain window, not all at once.
    spreads = {}
    for name, t0 in drains.items():
        # the first connection each client made after the drain began
        times = sorted(next(t - t0 for t, _ in conns if t > t0) for conns in connected_at
                       if any(t > t0 for t, _ in conns) and any(t < t0 and node == name for t, node in conns))
        assert len(times) >= CLIENTS // 4, (name, len(times), [c[-3:] for c in connected_at[:3]], t0)
        spreads[name] = {"clients": len(times), "first_s": round(times[0], 3),
                         "p50_s": round(statistics.median(times), 3), "last_s": round(times[-1], 3)}
        assert times[-1] - times[0] >= 0.5 * DRAIN_WINDOW, spreads[name]
    print(f"\nrolling restart via {kind}: {len(history)} messages to {CLIENTS} clients, "
          f"{unconfirmed} unconfirmed publishes; reconnections after each drain: {json.dumps(spreads)}")
