"""Requests the client sends and the answers it waits for; :class:`PendingPublish`.

A request is queued, taken by the connection's writer (which gives it its ``ref``), sent,
and settled by its answer (matched by ``ref``), by a timeout, or by the end of its
connection. No I/O here: the client moves requests through these stages.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from ._base import _ClientBase
    from ._subscription import Subscription
    from ._transport import _Connection
    from ._types import Ack, Position


class _Kind(enum.Enum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    REFRESH = "refresh"
    PRESENCE = "presence"
    PRESENCE_STATS = "presence_stats"


class _Stage(enum.Enum):
    QUEUED = 1   # waiting for the writer (a publish waits here while disconnected)
    SENDING = 2  # taken by the writer
    SENT = 3     # on the wire, waiting for its answer
    DONE = 4     # answered, failed, or given up


class _Request:
    """One request and its answer; ``ref`` is assigned when the writer sends it."""

    __slots__ = ("kind", "channel", "data", "sub", "target", "ref", "since", "conn", "stage",
                 "result", "error", "_lot")

    def __init__(self, kind: _Kind, channel: str, data: Any = None, sub: Subscription | None = None,
                 target: _Connection | None = None) -> None:
        self.kind = kind
        self.channel = channel
        self.data = data
        self.sub = sub
        self.target = target  # UNSUBSCRIBE: the connection whose subscription it ends
        self.ref: int | None = None
        self.since: Position | None = None
        self.conn: _Connection | None = None
        self.stage = _Stage.QUEUED
        self.result: Any = None
        self.error: Exception | None = None
        self._lot = trio.lowlevel.ParkingLot()

    def message(self) -> dict[str, Any]:
        if self.kind is _Kind.REFRESH:
            return {"type": "refresh", "token": self.data, "ref": self.ref}
        msg: dict[str, Any] = {"type": self.kind.value, "channel": self.channel, "ref": self.ref}
        if self.kind is _Kind.PUBLISH:
            msg["data"] = self.data
        elif self.kind is _Kind.SUBSCRIBE:
            # This client applies merge patches (state channels with delta = true).
            msg["delta"] = True
            if self.since is not None:
                msg["since"] = {"epoch": self.since.epoch, "offset": self.since.offset}
        return msg

    def sent(self) -> bool:
        """On the wire, waiting for its answer (a method: the stage changes across awaits)."""
        return self.stage is _Stage.SENT

    def set_stage(self, stage: _Stage) -> None:
        self.stage = stage
        self._lot.unpark_all()

    def resolve(self, result: Any) -> None:
        if self.stage is not _Stage.DONE:
            self.result = result
            self.set_stage(_Stage.DONE)

    def fail(self, error: Exception) -> None:
        if self.stage is not _Stage.DONE:
            self.error = error
            self.set_stage(_Stage.DONE)

    async def wait_changed(self) -> None:
        await self._lot.park()



class PendingPublish:
    """A publish made with :meth:`Client.publish_nowait`; await :meth:`wait_ack` for its ack."""

    def __init__(self, client: _ClientBase, request: _Request) -> None:
        self._client = client
        self._request = request

    @property
    def channel(self) -> str:
        return self._request.channel

    @property
    def done(self) -> bool:
        """True once the publish was acknowledged or failed."""
        return self._request.stage is _Stage.DONE

    async def wait_ack(self) -> Ack:
        """Wait for the ack (see :meth:`Client.publish` for errors and timeouts).

        Cancelling it while the publish is still queued withdraws the publish: it is never
        sent. Once sent, cancelling only stops the waiting.
        """
        ack: Ack = await self._client._wait(self._request)
        return ack

