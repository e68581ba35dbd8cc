"""``relay sub`` and ``relay pub``: the Python client on the command line.

:func:`add_client_commands` registers both subcommands on the ``relay`` parser
(relay/cli.py); ``python -m relay.client_cli sub ...`` runs them on their own. Messages and
acks go to stdout, one JSON object per line; connection news, losses and errors go to
stderr. The token comes from ``--token`` or, better (flags show in ``ps``), from
``RELAY_TOKEN``. This module imports trio and the client only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .client import Ack, Client, Event, Message, Poke, Position

DEFAULT_URL = "ws://127.0.0.1:8765/ws"  # (the same as relay.client.DEFAULT_URL)
ENV_URL = "RELAY_URL"
ENV_TOKEN = "RELAY_TOKEN"
DEFAULT_PUB_TIMEOUT_SECONDS = 10.0
#: Pause before publishing again after ``rate_limited`` (the server restores one strike a second).
RATE_LIMITED_RETRY_SECONDS = 1.0

EXIT_OK = 0
EXIT_ERROR = 1        # the server refused, the client closed, a publish timed out
EXIT_USAGE = 2        # bad arguments or bad input
EXIT_INTERRUPTED = 130  # 128 + SIGINT; SIGTERM gives 143


def add_client_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``sub`` and ``pub`` to ``subparsers``; each sets ``func`` to a handler returning an exit code."""
    sub = subparsers.add_parser(
        "sub", help="print a channel's messages as JSON lines",
        description="Subscribe to CHANNEL and print each message on stdout as one JSON line "
        '{"channel", "offset", "epoch", "data"} until interrupted (or --count). Reconnects and '
        "recovers by itself; lost messages (RecoveryLost, gap) are reported on stderr.")
    sub.add_argument("channel", metavar="CHANNEL")
    sub.add_argument("--since", metavar="EPOCH:OFFSET", type=_position,
                     help="start after this position (the epoch and offset of a message printed before)")
    sub.add_argument("-n", "--count", metavar="N", type=_positive_int,
                     help="exit after N messages")
    _add_connection_flags(sub)
    sub.set_defaults(func=run_sub)

    pub = subparsers.add_parser(
        "pub", help="publish JSON to a channel and print the acks",
        description="Publish DATA (a JSON value) to CHANNEL, or with DATA '-' each line of stdin "
        '(one JSON value per line, blank lines skipped), and print each ack as a JSON line '
        '{"channel", "offset", "epoch"}.')
    pub.add_argument("channel", metavar="CHANNEL")
    pub.add_argument("data", metavar="DATA", help="a JSON value, or - for JSON lines from stdin")
    pub.add_argument("--timeout", metavar="SECONDS", type=_positive_float,
                     default=DEFAULT_PUB_TIMEOUT_SECONDS,
                     help="give up on a publish not acknowledged within this time, waiting for "
                     f"the connection included (default {DEFAULT_PUB_TIMEOUT_SECONDS:g})")
    _add_connection_flags(pub)
    pub.set_defaults(func=run_pub)


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", metavar="URL",
                        help=f"the server's WebSocket URL (default: ${ENV_URL} or {DEFAULT_URL})")
    parser.add_argument("--token", metavar="JWT",
                        help=f"a token (default: ${ENV_TOKEN}; prefer the variable, flags show in ps)")
    parser.add_argument("--encoding", choices=("json", "msgpack"), default="json",
                        help="wire encoding (default json)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no connection news on stderr (errors and losses still)")


def _position(text: str) -> Position:
    from .client import Position

    try:
        return Position.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _settings(args: argparse.Namespace) -> tuple[str, str | None]:
    url = args.url or os.environ.get(ENV_URL) or DEFAULT_URL
    token = args.token or os.environ.get(ENV_TOKEN) or None
    return url, token


class _Output:
    """JSON lines on stdout; a reader that went away (``| head``) ends the command quietly."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.gone = False

    def line(self, obj: dict[str, Any]) -> bool:
        try:
            self.stream.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
            self.stream.flush()
        except BrokenPipeError:
            # Python would complain once more when flushing stdout at exit: point it elsewhere.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
            self.gone = True
        return not self.gone


class _News:
    """The client's events as short lines on stderr (``on_event``)."""

    def __init__(self, command: str, quiet: bool) -> None:
        self.command = command
        self.quiet = quiet

    def __call__(self, event: Event) -> None:
        from .client import Connected, Disconnected, Lost, Reconnecting, Subscribed

        text = None
        if isinstance(event, Lost):
            text = f"warning: {event.error}"
        elif self.quiet:
            return
        elif isinstance(event, Connected):
            text = f"connected (session {event.session}, node {event.node})"
        elif isinstance(event, Disconnected):  # (code None: an attempt that failed)
            text = event.reason if event.code is None else f"disconnected: {event.code} {event.reason}".rstrip()
        elif isinstance(event, Subscribed):
            how = " (recovered)" if event.recovered else ""
            text = f"subscribed to {event.channel!r} at {event.epoch}:{event.offset}{how}"
        elif isinstance(event, Reconnecting):
            text = f"reconnecting in {event.delay:.2f}s (attempt {event.attempt})"
        if text is not None:
            print(f"relay {self.command}: {text}", file=sys.stderr, flush=True)


def _message_line(msg: Message | Poke) -> dict[str, Any]:
    line: dict[str, Any] = {"channel": msg.channel, "offset": msg.offset, "epoch": msg.epoch,
                            "data": msg.data}
    if msg.data is None and type(msg).__name__ == "Poke":
        line["poke"] = True  # poke channel: fetch the data from the history endpoint
    return line


def _ack_line(ack: Ack) -> dict[str, Any]:
    return {"channel": ack.channel, "offset": ack.offset, "epoch": ack.epoch}


def _fail(command: str, message: object, code: int = EXIT_ERROR) -> int:
    print(f"relay {command}: {message}", file=sys.stderr, flush=True)
    return code


def _run(command: Callable[..., Awaitable[int]], *args: Any) -> int:
    """Run ``command`` under trio; SIGINT / SIGTERM cancel it and give 128 + the signal number.

    The signals are received as messages (not KeyboardInterrupt, which could surface in
    any task), so an interrupted command still closes its connection politely.
    """
    import trio

    async def main() -> int:
        code = EXIT_INTERRUPTED
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                async def watch() -> None:
                    nonlocal code
                    async for signum in signals:
                        code = 128 + signum
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch)
                code = await command(*args)
                nursery.cancel_scope.cancel()
        return code

    return trio.run(main)


def run_sub(args: argparse.Namespace) -> int:
    """``relay sub``: returns 0 (--count reached, or stdout closed), 1, 2, or 130 (Ctrl+C)."""
    return _run(_sub, args)


async def _sub(args: argparse.Namespace) -> int:
    from .client import ClientError, connect

    url, token = _settings(args)
    out = _Output(sys.stdout)
    try:
        async with connect(url, token=token, encoding=args.encoding, on_recovery_lost="event",
                           on_event=_News("sub", args.quiet)) as client:
            sub = await client.subscribe(args.channel, since=args.since)
            count = 0
            async for msg in sub:
                if not out.line(_message_line(msg)):
                    return EXIT_OK
                count += 1
                if args.count is not None and count >= args.count:
                    return EXIT_OK
    except ClientError as exc:  # closed by the server (1000/1008), refused, ...
        return _fail("sub", exc)
    return EXIT_OK  # pragma: no cover - the iterator only ends with the client


def run_pub(args: argparse.Namespace) -> int:
    """``relay pub``: returns 0 when every publish was acknowledged, 1, 2 or 130."""
    single: Any = None
    if args.data != "-":
        try:
            single = json.loads(args.data)
        except ValueError as exc:
            return _fail("pub", f"DATA is not valid JSON: {exc}", EXIT_USAGE)
    return _run(_pub, args, single)


async def _pub(args: argparse.Namespace, single: Any) -> int:

    from .client import ClientError, InvalidData, connect

    url, token = _settings(args)
    out = _Output(sys.stdout)
    try:
        async with connect(url, token=token, encoding=args.encoding,
                           request_timeout=args.timeout, on_event=_News("pub", args.quiet)) as client:
            if args.data != "-":
                ack = await _publish_one(client, args, single)
                if ack is None:
                    return EXIT_ERROR
                out.line(_ack_line(ack))
                return EXIT_OK
            lines = _Lines(sys.stdin)
            try:
                number = 0
                while (raw := await lines.next_line()) is not None:
                    number += 1
                    if not raw.strip():
                        continue
                    try:
                        value = json.loads(raw)
                    except ValueError as exc:  # (UnicodeDecodeError too)
                        return _fail("pub", f"stdin line {number} is not valid JSON: {exc}", EXIT_USAGE)
                    ack = await _publish_one(client, args, value)
                    if ack is None:
                        return EXIT_ERROR
                    if not out.line(_ack_line(ack)):
                        return EXIT_OK
                return EXIT_OK
            finally:
                await lines.aclose()
    except InvalidData as exc:
        return _fail("pub", exc, EXIT_USAGE)
    except ClientError as exc:
        return _fail("pub", exc)


class _Lines:
    """Lines of a text input, read so that cancellation (Ctrl+C) works while waiting.

    Pipes and terminals are read through a non-blocking ``FdStream``; regular files (and
    platforms without FdStream) through trio's thread-backed file wrapper.
    """

    def __init__(self, source: TextIO) -> None:
        self._source = source
        self._buffer = b""
        self._stream: Any = None
        self._file: Any = None
        self._eof = False

    async def next_line(self) -> bytes | None:
        import trio

        if self._stream is None and self._file is None:
            fd = self._source.fileno()
            if os.name == "posix" and not stat.S_ISREG(os.fstat(fd).st_mode):
                self._stream = trio.lowlevel.FdStream(os.dup(fd))
            else:
                self._file = trio.wrap_file(self._source.buffer)
        while b"\n" not in self._buffer and not self._eof:
            if self._stream is not None:
                chunk = await self._stream.receive_some(65536)
            else:
                chunk = await self._file.read1(65536)
            self._buffer += chunk
            self._eof = not chunk
        if not self._buffer:
            return None
        line, sep, self._buffer = self._buffer.partition(b"\n")
        return line

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()


async def _publish_one(client: Client, args: argparse.Namespace, value: Any) -> Ack | None:
    import trio

    from .client import ClientState, RequestFailed

    with trio.move_on_after(args.timeout):
        while True:
            try:
                return await client.publish(args.channel, value)
            except RequestFailed as exc:
                if exc.code != "rate_limited":
                    raise
            # The server dropped it (so sending it again cannot duplicate it). Each refusal
            # costs a strike and strikes come back at one per second: waiting that long
            # never runs out of them (which would close the connection with 4003).
            if not args.quiet:
                print("relay pub: rate limited by the server; retrying in 1s", file=sys.stderr, flush=True)
            await trio.sleep(RATE_LIMITED_RETRY_SECONDS)
    if client.state is ClientState.CONNECTED:
        text = f"no ack within {args.timeout:g}s; it may or may not have been published"
    else:  # still queued: withdrawn, never sent
        text = f"not published: no connection to {client.url} within {args.timeout:g}s"
    print(f"relay pub: {text}", file=sys.stderr, flush=True)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sub`` / ``pub`` without the rest of the ``relay`` command line."""
    parser = argparse.ArgumentParser(prog="relay", description="relay's client commands.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_client_commands(commands)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["add_client_commands", "run_sub", "run_pub", "main"]
