"""``relay sub`` and ``relay pub`` as child processes against a real in-process server.

They run as ``python -m relay.client_cli``, the same parser and handlers ``relay`` itself
uses once relay/cli.py registers them (see test_relay_command_line_has_sub_and_pub).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from relay.client import connect
from relay.config import LimitsConfig

from .conftest import REPO, child_env, running_proxy, running_server

CLI = [sys.executable, "-m", "relay.client_cli"]
CONNECTED = re.compile(r"relay sub: connected \(session ([0-9a-f]+)")
SUBSCRIBED = re.compile(r"relay sub: subscribed to 'c' at ([0-9a-f]+):0")


async def run_cli(*args: str, stdin: bytes = b"", **env: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process([*CLI, *args], stdin=stdin, capture_stdout=True,
                                  capture_stderr=True, check=False, env=child_env(**env), cwd=REPO)


class CliProcess:
    """A running client command; stdout lines and stderr text collected as they come."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.stderr = ""
        self._lot = trio.lowlevel.ParkingLot()

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        buffer = b""
        async for chunk in self.proc.stdout:
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                self.lines.append(json.loads(line))
                self._lot.unpark_all()
        self._lot.unpark_all()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for chunk in self.proc.stderr:
            self.stderr += chunk.decode()
            self._lot.unpark_all()
        self._lot.unpark_all()

    async def wait_stderr(self, pattern: re.Pattern[str]) -> re.Match[str]:
        while (found := pattern.search(self.stderr)) is None:
            assert self.proc.returncode is None, self.stderr
            await self._lot.park()
        return found

    async def wait_lines(self, count: int) -> None:
        while len(self.lines) < count:
            assert self.proc.returncode is None, self.stderr
            await self._lot.park()


@asynccontextmanager
async def cli_process(*args: str, **env: str) -> AsyncIterator[CliProcess]:
    proc = await trio.lowlevel.open_process(
        [*CLI, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=child_env(**env), cwd=REPO)
    cli = CliProcess(proc)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cli._read_stdout)
            nursery.start_soon(cli._read_stderr)
            yield cli
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_sub_prints_each_message_as_a_json_line(encoding: str) -> None:
    with trio.fail_after(30):
        async with running_server() as server, connect(server.url) as pub:
            first = await pub.publish("chat.cli", {"text": "before"})
            async with cli_process("sub", "chat.cli", "--url", server.url, "--encoding", encoding,
                                   "--since", f"{first.epoch}:0", "-n", "3") as cli:
                await cli.wait_stderr(CONNECTED)
                await pub.publish("chat.cli", ["ü", 1.5, None])
                await pub.publish("chat.cli", "last")
            assert cli.proc.returncode == 0, cli.stderr
            assert cli.lines == [
                {"channel": "chat.cli", "offset": 1, "epoch": first.epoch, "data": {"text": "before"}},
                {"channel": "chat.cli", "offset": 2, "epoch": first.epoch, "data": ["ü", 1.5, None]},
                {"channel": "chat.cli", "offset": 3, "epoch": first.epoch, "data": "last"},
            ]


async def test_sub_reports_a_lost_recovery_on_stderr_and_goes_on() -> None:
    with trio.fail_after(30):
        async with running_server() as server, connect(server.url) as pub:
            async with cli_process("sub", "c", "--url", server.url, "--since", "gone:5", "-n", "1") as cli:
                await cli.wait_stderr(re.compile("warning: could not recover 'c' from gone:5"))
                ack = await pub.publish("c", 1)
            assert cli.proc.returncode == 0, cli.stderr
            assert cli.lines == [{"channel": "c", "offset": 1, "epoch": ack.epoch, "data": 1}]


async def test_sub_follows_a_kick_and_exits_1_when_the_server_says_1008() -> None:
    with trio.fail_after(30):
        async with running_server() as server, connect(server.url) as pub:
            async with cli_process("sub", "c", "--url", server.url) as cli:
                session = (await cli.wait_stderr(CONNECTED)).group(1)
                epoch = (await cli.wait_stderr(SUBSCRIBED)).group(1)
                await pub.publish("c", 1)
                await cli.wait_lines(1)
                server.connections[session].kick(4002, "slow consumer: send queue overflowed")
                await cli.wait_stderr(re.compile("disconnected: 4002"))
                await cli.wait_stderr(re.compile(f"subscribed to 'c' at {epoch}:1 \\(recovered\\)"))
                session = (await cli.wait_stderr(re.compile(r"connected \(session (?!" + session + r")([0-9a-f]+)"))).group(1)
                await pub.publish("c", 2)
                await cli.wait_lines(2)
                server.connections[session].kick(1008, "policy")
            assert cli.proc.returncode == 1, cli.stderr
            assert [line["offset"] for line in cli.lines] == [1, 2]
            assert "1008" in cli.stderr and "not reconnecting" in cli.stderr
            assert "Traceback" not in cli.stderr


async def test_sub_exits_130_on_ctrl_c() -> None:
    with trio.fail_after(30):
        async with running_server() as server:
            async with cli_process("sub", "c", "--url", server.url) as cli:
                await cli.wait_stderr(CONNECTED)
                cli.proc.send_signal(signal.SIGINT)
            assert cli.proc.returncode == 130
            assert "Traceback" not in cli.stderr


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_pub_data_and_lines_from_stdin(encoding: str) -> None:
    with trio.fail_after(30):
        async with running_server() as server:
            one = await run_cli("pub", "p", '{"a": 1}', "--url", server.url, "--encoding", encoding)
            assert one.returncode == 0, one.stderr
            (ack,) = [json.loads(line) for line in one.stdout.decode().splitlines()]
            assert ack["channel"] == "p" and ack["offset"] == 1 and isinstance(ack["epoch"], str)
            many = await run_cli("pub", "p", "-", "--url", server.url, "--encoding", encoding,
                                 stdin=b'"two"\n\n[3]\n{"four": 4}\nnull\n')
            assert many.returncode == 0, many.stderr
            acks = [json.loads(line) for line in many.stdout.decode().splitlines()]
            assert [a["offset"] for a in acks] == [2, 3, 4, 5]
            _, retained = server.hub.history("p", trio.current_time(), None, None)  # type: ignore[misc]
            assert [p.data for p in retained] == [{"a": 1}, "two", [3], {"four": 4}, None]


async def test_pub_bad_json_is_a_usage_error() -> None:
    with trio.fail_after(30):
        async with running_server() as server:
            bad = await run_cli("pub", "p", "{oops", "--url", server.url)
            assert bad.returncode == 2 and b"DATA is not valid JSON" in bad.stderr
            partly = await run_cli("pub", "p", "-", "--url", server.url, stdin=b"1\nnope\n3\n")
            assert partly.returncode == 2 and b"stdin line 2 is not valid JSON" in partly.stderr
            assert [json.loads(line)["offset"] for line in partly.stdout.decode().splitlines()] == [1]
            too_big = await run_cli("pub", "p", str(2**70), "--url", server.url)
            assert too_big.returncode == 2 and b"64-bit" in too_big.stderr


async def test_pub_refused_by_the_server_exits_1() -> None:
    with trio.fail_after(30):
        async with running_server(channels=[{"pattern": "ro.*", "client_publish": False}]) as server:
            refused = await run_cli("pub", "ro.x", "1", "--url", server.url)
            assert refused.returncode == 1 and b"forbidden" in refused.stderr


async def test_pub_without_a_server_gives_up_after_the_timeout() -> None:
    with trio.fail_after(30):
        result = await run_cli("pub", "p", "1", "--url", "ws://127.0.0.1:9/ws", "--timeout", "0.3")
    assert result.returncode == 1
    assert b"not published: no connection to ws://127.0.0.1:9/ws within 0.3s" in result.stderr
    assert b"cannot connect" in result.stderr and b"Traceback" not in result.stderr


async def test_token_and_url_from_the_environment() -> None:
    with trio.fail_after(30):
        async with running_server() as server, running_proxy(server.port) as proxy:
            env = await run_cli("pub", "t", "1", RELAY_URL=proxy.url, RELAY_TOKEN="from-env")
            assert env.returncode == 0, env.stderr
            flag = await run_cli("pub", "t", "2", "--url", proxy.url, "--token", "from-flag",
                                 RELAY_TOKEN="from-env")
            assert flag.returncode == 0, flag.stderr
            none = await run_cli("pub", "t", "3", "--url", proxy.url, "-q")
            assert none.returncode == 0 and none.stderr == b"", none.stderr
            assert proxy.authorizations() == ["Bearer from-env", "Bearer from-flag", None]


async def test_usage_errors() -> None:
    with trio.fail_after(30):
        for args, fragment in [
            (["sub", "c", "--since", "17"], b"EPOCH:OFFSET"),
            (["sub", "c", "-n", "0"], b"integer >= 1"),
            (["pub", "c", "1", "--timeout", "-1"], b"seconds > 0"),
            (["pub", "c"], b"DATA"),
            ([], b"usage"),
        ]:
            result = await run_cli(*args)
            assert result.returncode == 2, (args, result.stderr)
            assert fragment in result.stderr, (args, result.stderr)


def test_relay_command_line_has_sub_and_pub() -> None:
    """relay/cli.py wires add_client_commands in: ``relay sub|pub`` are these commands."""
    from relay.cli import main

    assert main(["sub", "--help"]) == 0
    assert main(["pub", "--help"]) == 0


async def test_pub_waiting_on_stdin_exits_130_on_ctrl_c() -> None:
    with trio.fail_after(30):
        async with running_server() as server:
            proc = await trio.lowlevel.open_process(
                [*CLI, "pub", "c", "-", "--url", server.url], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), cwd=REPO)
            cli = CliProcess(proc)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cli._read_stdout)
                    nursery.start_soon(cli._read_stderr)
                    await cli.wait_stderr(re.compile("relay pub: connected"))
                    proc.send_signal(signal.SIGINT)  # stdin stays open and silent
                    await proc.wait()
            finally:
                assert proc.stdin is not None
                await proc.stdin.aclose()
            assert proc.returncode == 130, cli.stderr


async def test_pub_from_stdin_slows_down_when_rate_limited() -> None:
    lines = b"".join(b"%d\n" % i for i in range(40))
    limits = LimitsConfig(messages_per_second=50, messages_burst=10)
    with trio.fail_after(30):
        async with running_server(limits=limits) as server:
            result = await run_cli("pub", "r", "-", "--url", server.url, stdin=lines)
            assert result.returncode == 0, result.stderr
            assert b"rate limited by the server; retrying in 1s" in result.stderr
            assert [json.loads(line)["offset"] for line in result.stdout.decode().splitlines()] == list(range(1, 41))
            _, retained = server.hub.history("r", trio.current_time(), None, None)  # type: ignore[misc]
            assert [p.data for p in retained] == list(range(40))  # each once, in order
