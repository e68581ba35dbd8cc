"""The real command line: ``python -m relay serve`` in a child process, driven over loopback
and with real signals.

The child runs from a temporary directory (not the repository), finds the package through
PYTHONPATH, and gets none of the caller's RELAY_* settings unless a test sets them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from websockets.exceptions import ConnectionClosed
from websockets.trio.client import ClientConnection, connect

from relay.config import CONFIG_KEYS

from .conftest import pop_ts
from .test_bad_input import OP_CLOSE, RawSocket

REPO = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"relay listening on ws://127\.0\.0\.1:(\d+)/ws \(node ([^)]+)\)")


# The caller's configuration variables stay out of the child (RELAY_PURE_PYTHON and the like
# stay in: they choose the implementation, not the configuration).
CONFIG_ENV = {"RELAY_CONFIG", *("RELAY_" + key.upper() for key in CONFIG_KEYS)}


#: A ``relay`` command installed from a built wheel (ci/wheel_check.sh sets it to run
#: tests/deploy against the wheel); unset: ``python -m relay`` from this checkout.
INSTALLED_RELAY = os.environ.get("RELAY_TEST_SERVE", "")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_ENV}
    if not INSTALLED_RELAY:  # (an installed relay must not import this checkout instead)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


def relay_cmd(*args: str) -> list[str]:
    if INSTALLED_RELAY:
        return [INSTALLED_RELAY, "serve", *args]
    return [sys.executable, "-m", "relay", "serve", *args]


class RelayProcess:
    """A running ``relay serve``; its output (stdout and stderr merged) is collected as it comes."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.output = ""
        self.closed = False
        self._more = trio.Event()
        self.port = 0
        self.node = ""

    async def collect(self) -> None:
        assert self.proc.stdout is not None
        async for chunk in self.proc.stdout:
            self.output += chunk.decode(errors="replace")
            self._more.set()
            self._more = trio.Event()
        self.closed = True
        self._more.set()

    async def wait_for(self, pattern: re.Pattern[str] | str) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        while True:
            if (found := regex.search(self.output)) is not None:
                return found
            assert not self.closed, f"relay exited without printing {regex.pattern!r}:\n{self.output}"
            await self._more.wait()

    async def started(self) -> None:
        found = await self.wait_for(LISTENING)
        self.port, self.node = int(found.group(1)), found.group(2)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


@asynccontextmanager
async def relay_process(cwd: Path, *args: str, env: dict[str, str] | None = None) -> AsyncIterator[RelayProcess]:
    proc = await trio.lowlevel.open_process(
        relay_cmd(*args), cwd=cwd, env=child_env() if env is None else env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    relay = RelayProcess(proc)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.collect)
            try:
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


async def run_relay(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``relay serve`` expecting it to stop on its own (start-up errors)."""
    return await trio.run_process(
        relay_cmd(*args), cwd=cwd, env=child_env() if env is None else env,
        stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True, check=False)


async def welcome(ws: ClientConnection) -> dict[str, object]:
    msg = json.loads(await ws.recv())
    assert msg["type"] == "welcome", msg
    return msg  # type: ignore[no-any-return]


def occupied_port() -> socket.socket:
    """A listening socket on 127.0.0.1; its port is in use while it stays open."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


# --------------------------------------------------------------------------- tests


async def test_serve_logs_where_it_listens_and_serves(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with relay_process(tmp_path, "--port", "0", "--node-id", "n1") as relay:
            await relay.started()
            assert relay.node == "n1" and relay.port > 0
            async with connect(relay.url) as sub, connect(relay.url) as pub:
                assert (await welcome(sub))["node"] == "n1"
                assert (await welcome(pub))["node"] == "n1"
                await sub.send(json.dumps({"type": "subscribe", "channel": "c", "ref": 1}))
                subscribed = json.loads(await sub.recv())
                assert subscribed["type"] == "subscribed" and subscribed["ref"] == 1, subscribed
                await pub.send(json.dumps({"type": "publish", "channel": "c", "data": {"hi": 1}, "ref": 2}))
                ack = json.loads(await pub.recv())
                assert ack == {"type": "ack", "ref": 2, "channel": "c", "offset": 1,
                               "epoch": subscribed["epoch"]}, ack
                assert pop_ts(json.loads(await sub.recv())) == {"type": "message", "channel": "c", "offset": 1,
                                                        "data": {"hi": 1}}
            relay.proc.send_signal(signal.SIGTERM)
            assert await relay.proc.wait() == 0, relay.output


async def _close_of(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await ws.recv()
    assert info.value.rcvd is not None, f"no close frame: {info.value}"
    return info.value.rcvd.code, info.value.rcvd.reason


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_drains_clients_with_1001_and_a_reconnect_hint(tmp_path: Path, signum: int) -> None:
    drain_window = 0.8
    config = tmp_path / "relay.toml"
    config.write_text(f"drain_window = {drain_window}\ndrain_timeout = 10\n")
    with trio.fail_after(40):
        async with relay_process(tmp_path, "--port", "0", "--config", str(config)) as relay:
            await relay.started()
            async with connect(relay.url) as a, connect(relay.url) as b:
                await welcome(a)
                await welcome(b)
                # A client that never answers the close handshake keeps the drain going for a
                # while, and a keep-alive HTTP connection is already open to ask /readyz.
                stubborn = await RawSocket.open(relay.port)
                http = await RawSocket.open(relay.port)
                try:
                    await stubborn.handshake()
                    await http.send(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
                    ready = await http.read_response()
                    assert ready is not None and ready.status == 200, ready

                    relay.proc.send_signal(signum)
                    closes = [await _close_of(a), await _close_of(b)]
                    # the drain has begun: readiness fails while it goes on
                    await http.send(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
                    draining = await http.read_response()
                    if draining is not None:  # (a server may also just close idle keep-alives)
                        assert draining.status == 503, draining
                    frames = []
                    while (frame := await stubborn.recv_frame()) is not None:
                        frames.append(frame)
                    closes += [(f.close_code, f.close_reason) for f in frames if f.opcode == OP_CLOSE]
                finally:
                    await stubborn.aclose()
                    await http.aclose()
            assert len(closes) == 3, (closes, relay.output)
            for code, reason in closes:
                assert code == 1001, (code, reason)
                hint = json.loads(reason)
                assert set(hint) == {"reconnect_after_ms"}, hint
                delay = hint["reconnect_after_ms"]
                assert isinstance(delay, int) and 0 <= delay <= drain_window * 1000, hint
            assert await relay.proc.wait() == 0, relay.output
            assert "draining" in relay.output


async def test_signal_with_no_clients_exits_0(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with relay_process(tmp_path, "--port", "0") as relay:
            await relay.started()
            relay.proc.send_signal(signal.SIGINT)
            assert await relay.proc.wait() == 0, relay.output
            assert "Traceback" not in relay.output, relay.output


@pytest.mark.parametrize("toml, fragments", [
    ('[[channels]]\npattern = "chat.*"\nmode = "fast"\n', ["channels[0].mode", "'fast'", "stream", "state", "poke"]),
    ('port = "eighty"\n', ["port", "'eighty'", "integer"]),
    ('prot = 8000\n', ["'prot'", "port"]),
    ('[[channels]]\npattern = "a.*"\nslow_consumer = "block"\n',
     ["channels[0].slow_consumer", "disconnect", "drop", "conflate"]),
], ids=["mode", "port-type", "unknown-key", "slow-consumer"])
async def test_bad_config_file_stops_start_up_with_exit_2(tmp_path: Path, toml: str, fragments: list[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    with trio.fail_after(30):
        result = await run_relay(tmp_path, "--port", "0", "--config", str(config))
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert str(config) in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert "Traceback" not in err and "listening" not in err, err


async def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with occupied_port() as blocker:
        port = blocker.getsockname()[1]
        with trio.fail_after(30):
            result = await run_relay(tmp_path, "--port", str(port))
    err = result.stderr.decode() + result.stdout.decode()
    assert result.returncode != 0, err
    assert str(port) in err, err
    assert "in use" in err.lower(), err
    assert "Traceback" not in err, err


async def test_relay_port_from_the_environment_is_used(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that is free right now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with trio.fail_after(30):
        async with relay_process(tmp_path, env=child_env(RELAY_PORT=str(port), RELAY_NODE_ID="env-node")) as relay:
            await relay.started()
            assert relay.port == port
            assert relay.node == "env-node"
            async with connect(relay.url) as ws:
                assert (await welcome(ws))["node"] == "env-node"
            relay.proc.send_signal(signal.SIGTERM)
            assert await relay.proc.wait() == 0, relay.output


async def test_port_flag_beats_the_environment(tmp_path: Path) -> None:
    with occupied_port() as blocker, trio.fail_after(30):
        busy = blocker.getsockname()[1]
        # were RELAY_PORT used, start-up would fail: that port is taken
        async with relay_process(tmp_path, "--port", "0", "--node-id", "flag-node",
                                 env=child_env(RELAY_PORT=str(busy), RELAY_NODE_ID="env-node")) as relay:
            await relay.started()
            assert relay.port not in (0, busy)
            assert relay.node == "flag-node"
            async with connect(relay.url) as ws:
                assert (await welcome(ws))["node"] == "flag-node"
            relay.proc.send_signal(signal.SIGTERM)
            assert await relay.proc.wait() == 0, relay.output


async def test_config_file_named_by_relay_config_is_read(tmp_path: Path) -> None:
    config = tmp_path / "env.toml"
    config.write_text('node_id = "from-file"\nport = 0\n')
    with trio.fail_after(30):
        async with relay_process(tmp_path, env=child_env(RELAY_CONFIG=str(config))) as relay:
            await relay.started()
            assert relay.node == "from-file"
            relay.proc.send_signal(signal.SIGTERM)
            assert await relay.proc.wait() == 0, relay.output
