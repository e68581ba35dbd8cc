"""Opening a WebSocket to relay, and what the client keeps about one connection.

trio-websocket does the WebSocket protocol. This module adds what the client needs
around it: a stream wrapper that notices a server hanging up during the handshake (which
trio-websocket would wait out until the timeout), readable connect errors, and picking a
ConnectionRejected out of the exception group a nursery wraps it in.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import trio
from trio_websocket import WebSocketConnection

from ._policy import Decision

if sys.version_info < (3, 11):  # pragma: no cover - trio depends on the backport there
    from exceptiongroup import BaseExceptionGroup

#: Messages trio-websocket may read ahead of the client's reader.
WS_MESSAGE_QUEUE = 32
#: Largest message accepted from the server (the server's own limit is at most 16 MiB).
MAX_INCOMING_MESSAGE_BYTES = 32 * 1024 * 1024
#: Ping interval when the server's welcome names no heartbeat.
DEFAULT_HEARTBEAT_SECONDS = 25.0


class _ProtocolError(Exception):
    """The server sent something this client cannot understand (internal; closes with 1002)."""



class _Connection:
    """One open WebSocket and how it ended."""

    __slots__ = ("ws", "heartbeat", "opened_at", "code", "reason", "decision", "send_close",
                 "paused", "paused_during_ping")

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.heartbeat = DEFAULT_HEARTBEAT_SECONDS
        self.opened_at: float | None = None
        #: How it ended, for the Disconnected event and the policy.
        self.code: int | None = None
        self.reason = ""
        #: Overrides the close-code policy (a fatal local problem).
        self.decision: Decision | None = None
        #: The close frame this client sends when it ends the connection itself.
        self.send_close: tuple[int, str] | None = None
        #: The reader waits for room in a subscription (the server's pongs wait with it).
        self.paused = False
        self.paused_during_ping = False

    def end(self, code: int | None, reason: str, *, send: tuple[int, str] | None = None,
            decision: Decision | None = None) -> None:
        """Record why the connection ends (the first reason wins)."""
        if self.code is None and not self.reason:
            self.code, self.reason, self.send_close, self.decision = code, reason, send, decision



class _HangupWatch(trio.abc.Stream):
    """A stream that calls ``on_eof`` when the peer hangs up (to end a handshake wait)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self._inner = inner
        self.on_eof: Callable[[], None] | None = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self._inner.receive_some(max_bytes)
        if not data and self.on_eof is not None:
            self.on_eof()
        return bytes(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._inner.aclose()


_E = TypeVar("_E", bound=BaseException)


def _only(group: BaseExceptionGroup[BaseException], kind: type[_E]) -> _E | None:
    """Return the one exception of ``kind`` when that is all ``group`` holds, else None."""
    match, rest = group.split(kind)
    if rest is not None or match is None:
        return None
    leaves: list[BaseException] = []
    stack: list[BaseException] = [match]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 and isinstance(leaves[0], kind) else None


def _describe_connect_error(exc: BaseException) -> str:
    """Say why a TCP/TLS connection failed; trio's own message hides the reasons in its cause."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        reasons = sorted({str(getattr(e, "strerror", None) or e) for e in cause.exceptions})
        return f"{exc} ({'; '.join(reasons)})"
    return str(exc) if cause is None else f"{exc} ({cause})"

