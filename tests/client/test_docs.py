"""The examples in docs/clients.md, run as they are written, against a real server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from relay.client import connect

from .conftest import REPO, child_env, running_server

DOC = REPO / "docs" / "clients.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def examples() -> dict[str, str]:
    """The ``# file: NAME`` blocks of the doc, by name."""
    found = {}
    for block in BLOCK.findall(DOC.read_text()):
        first, _, rest = block.partition("\n")
        if first.startswith("# file: "):
            found[first.removeprefix("# file: ").strip()] = rest
    return found


def test_the_doc_has_the_four_examples_and_they_compile() -> None:
    found = examples()
    assert set(found) == {"chat.py", "ticker.py", "lobby.py", "feed.py"}
    for block in BLOCK.findall(DOC.read_text()):
        if block.startswith(("import", "# file:")):
            compile(block, "docs/clients.md", "exec")


class Program:
    """An example running in a child process; its stdout lines collected as they come."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._lot = trio.lowlevel.ParkingLot()

    async def collect(self) -> None:
        assert self.proc.stdout is not None
        buffer = b""
        async for chunk in self.proc.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            self.lines += [line.decode() for line in lines]
            self._lot.unpark_all()

    async def wait_line(self, text: str) -> None:
        while text not in self.lines:
            await self._lot.park()

    async def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(line.encode() + b"\n")


async def start(nursery: trio.Nursery, tmp_path: Path, url: str, name: str, *args: str) -> Program:
    script = tmp_path / name
    script.write_text(examples()[name])
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(script), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env=child_env(RELAY_URL=url), cwd=tmp_path)
    program = Program(proc)
    nursery.start_soon(program.collect)
    return program


async def stop(program: Program) -> None:
    if program.proc.stdin is not None:
        await program.proc.stdin.aclose()  # chat.py and lobby.py leave at the end of their input
    with trio.move_on_after(5):
        await program.proc.wait()
    if program.proc.returncode is None:
        program.proc.kill()
        await program.proc.wait()


async def test_chat(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_server() as server, trio.open_nursery() as nursery:
            ann = await start(nursery, tmp_path, server.url, "chat.py", "lobby", "ann")
            bob = await start(nursery, tmp_path, server.url, "chat.py", "lobby", "bob")
            await ann.wait_line("-- you are in chat.lobby as ann --")
            await bob.wait_line("-- you are in chat.lobby as bob --")
            await ann.say("hello bob")
            await bob.wait_line("ann: hello bob")
            await bob.say("hi ann")
            await ann.wait_line("bob: hi ann")
            await stop(ann)
            await stop(bob)
            assert ann.proc.returncode == 0 and bob.proc.returncode == 0
            assert ann.lines == ["-- you are in chat.lobby as ann --", "ann: hello bob", "bob: hi ann"]


async def test_ticker(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_server(channels=[{"pattern": "prices.*", "mode": "state"}]) as server, \
                connect(server.url) as feed, trio.open_nursery() as nursery:
            await feed.publish("prices.BTC", {"bid": 100.0, "ask": 100.5})  # the current value
            ticker = await start(nursery, tmp_path, server.url, "ticker.py", "BTC", "ETH")
            await ticker.wait_line("BTC bid 100.00 ask 100.50")
            await feed.publish("prices.ETH", {"bid": 3.25, "ask": 3.5})
            await ticker.wait_line("ETH bid 3.25 ask 3.50")
            ticker.proc.kill()
            await ticker.proc.wait()


async def test_lobby(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_server() as server, trio.open_nursery() as nursery:
            ann = await start(nursery, tmp_path, server.url, "lobby.py", "l1", "ann")
            await ann.wait_line("lobby: ann")
            bob = await start(nursery, tmp_path, server.url, "lobby.py", "l1", "bob")
            await bob.wait_line("lobby: ann, bob")  # bob learned that ann was there first
            await ann.wait_line("lobby: ann, bob")
            await ann.say("ready")
            await bob.wait_line("lobby: ann*, bob")
            await bob.say("ready")
            for player in (ann, bob):
                await player.wait_line("everyone is ready: the game starts")
                with trio.move_on_after(5):
                    await player.proc.wait()
                assert player.proc.returncode == 0, player.lines
                if player.proc.stdin is not None:
                    await player.proc.stdin.aclose()


@pytest.mark.parametrize("name", ["chat.py", "ticker.py", "lobby.py", "feed.py"])
def test_examples_say_how_to_run_them(name: str) -> None:
    assert f"python {name}" in examples()[name]


async def test_feed_fast_reader_gets_everything_slow_reader_the_newest_of_every_symbol(tmp_path: Path) -> None:
    """The trading-feed example, run as written: 50 symbols, 1,500 updates; the fast reader
    reads every one, the slow one (5 ms per update) far fewer, and both end with the last
    price of every symbol."""
    symbols = [f"S{i:02d}" for i in range(50)]
    channels = [{"pattern": "ticks.*", "conflate_key": "symbol"}]
    DEPTH = [[100 + i / 100, 10 * i] for i in range(40)]  # noqa: N806
    with trio.fail_after(60):
        async with running_server(channels=channels, max_message_size=4096, send_queue_size=16384) as server, \
                trio.open_nursery() as nursery:
            fast = await start(nursery, tmp_path, server.url, "feed.py")
            slow = await start(nursery, tmp_path, server.url, "feed.py", "0.005")
            await fast.wait_line("subscribed")
            await slow.wait_line("subscribed")
            last: dict[str, float] = {}
            n = 0
            for _ in range(30):  # 30 rounds over the symbols, 1,500 updates in ~1.5 s
                for symbol in symbols:
                    n += 1
                    last[symbol] = price = round(100 + n / 100, 2)
                    # (an order-book's worth of depth per update: the socket buffers hold few)
                    server.hub.publish("ticks.eq", {"symbol": symbol, "price": price, "depth": DEPTH},
                                       trio.current_time())
                await trio.sleep(0.05)
            # The slow reader still works through what its socket buffers hold: wait until
            # its once-a-second count stops moving.
            counts: list[str] = []
            while len(counts) < 2 or counts[-1] != counts[-2]:
                await trio.sleep(1.05)
                counts.append([line for line in slow.lines if line.startswith("symbols ")][-1].split()[3])
            for program in (fast, slow):
                await stop(program)
                assert program.proc.returncode == 0, program.lines
    summaries = {}
    for name, program in (("fast", fast), ("slow", slow)):
        summary = [line for line in program.lines if line.startswith("symbols ")][-1]
        words = summary.split()
        summaries[name] = int(words[3])
        assert words[1] == "50", summary
        held = dict(line.split() for line in program.lines if line.startswith("S"))
        assert {symbol: float(price) for symbol, price in held.items()} == last, name
    assert summaries["fast"] == 1500, summaries
    assert summaries["slow"] < 1000, summaries
