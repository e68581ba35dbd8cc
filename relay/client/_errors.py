"""The errors the Python client raises, all under :class:`ClientError` (a ``RelayError``).

::

    RelayError                      (relay.errors)
    └── ClientError                 anything the client raises
        ├── ClientClosed            the client stopped for good (1000, 1008, a refused handshake, closed by you)
        ├── OfflineQueueFull        publish while disconnected with max_offline_queue publishes already waiting
        ├── InvalidData             data that not every subscriber could receive (bytes, NaN, int keys, ...)
        ├── AlreadySubscribed       subscribe() to a channel this client is already subscribed to
        ├── RequestTimeout          no answer within request_timeout of sending the request
        ├── RequestFailed           the server answered with an ``error`` (carries its ``code``)
        ├── PublishUnconfirmed      the connection ended after the publish was sent, before its ack
        ├── SubscriptionEnded       the server ended a subscription (a refreshed token no longer allows it)
        ├── EventsOverflow          an events() listener fell more than its buffer behind
        └── MessagesLost            the application cannot get every message of a channel
            ├── RecoveryLost        resubscribing answered ``recovered: false``
            └── MessagesSkipped     the server sent ``gap``: these offsets will not come

This module imports nothing from trio.
"""

from __future__ import annotations

from ..errors import RelayError


class ClientError(RelayError):
    """Base class of every error raised by :mod:`relay.client`."""


class ClientClosed(ClientError):
    """The client is closed and will not reconnect.

    Attributes:
        code: the WebSocket close code that ended it (1000, 1008, 4001 without a
            ``token_callback``, ...), or None when it was not a close frame (closed by the
            application, a handshake the server refused, a failing ``token_callback``).
        reason: the close reason or a description of what happened.
        http_status: the HTTP status when the server refused the WebSocket handshake.
    """

    def __init__(self, message: str, *, code: int | None = None, reason: str = "",
                 http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.http_status = http_status


class OfflineQueueFull(ClientError):
    """A publish found the offline queue full; it was not queued and will not be sent."""

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class InvalidData(ClientError, ValueError):
    """The data cannot be published: some subscriber's encoding could not carry it."""


class AlreadySubscribed(ClientError, ValueError):
    """This client is already subscribed to the channel (use the existing Subscription)."""


class RequestTimeout(ClientError):
    """The server did not answer a request within ``request_timeout`` seconds of sending it.

    For a publish this means the outcome is unknown: it may or may not have been published.
    """


class RequestFailed(ClientError):
    """The server answered a request with an ``error``.

    Attributes:
        code: the protocol error code (``bad_request``, ``forbidden``, ``unauthorized``, ...).
        message: the server's human-readable message.
        channel: the channel of the request.
    """

    def __init__(self, code: str, message: str, *, channel: str | None = None) -> None:
        where = f" ({channel!r})" if channel is not None else ""
        super().__init__(f"server refused the request{where}: {code}: {message}")
        self.code = code
        self.message = message
        self.channel = channel


class PublishUnconfirmed(ClientError):
    """The connection ended after a publish was sent and before its ack arrived.

    The server may or may not have published it; the client does not resend it, so that
    a publish is never duplicated. Publish it again if a duplicate is acceptable.

    Attributes:
        channel: the channel of the publish.
        code: the close code of the connection that ended (1006 for a dropped connection).
    """

    def __init__(self, message: str, *, channel: str, code: int | None) -> None:
        super().__init__(message)
        self.channel = channel
        self.code = code


class SubscriptionEnded(ClientError):
    """The server ended the subscription on its own.

    It does so when a token :meth:`~relay.client.Client.refresh` replaced the token's
    ``channels`` claim with one that no longer covers the channel.
    """

    def __init__(self, message: str, *, channel: str) -> None:
        super().__init__(message)
        self.channel = channel


class EventsOverflow(ClientError):
    """An :meth:`~relay.client.Client.events` listener fell more than its buffer behind."""


class MessagesLost(ClientError):
    """Messages of a channel will not reach the application (the base of two cases).

    Attributes:
        channel: the channel.
    """

    def __init__(self, message: str, *, channel: str) -> None:
        super().__init__(message)
        self.channel = channel


class RecoveryLost(MessagesLost):
    """Resubscribing could not recover every message since the last one the client had.

    Either the channel's history was lost (the server restarted and the channel has a new
    epoch) or the missed messages are no longer retained. Messages after ``new_offset`` in
    ``new_epoch`` arrive complete and in order; refetch what came before from your source
    of truth.

    Attributes:
        old_epoch, old_offset: the position the client asked to resume from.
        new_epoch, new_offset: the channel's epoch and offset when it was resubscribed.
    """

    def __init__(self, channel: str, old_epoch: str, old_offset: int, new_epoch: str,
                 new_offset: int) -> None:
        if old_epoch != new_epoch:
            what = f"the channel has a new epoch ({old_epoch} -> {new_epoch}, offset {new_offset})"
        else:
            what = f"messages after offset {old_offset} are no longer all retained (now at {new_offset})"
        super().__init__(f"could not recover {channel!r} from {old_epoch}:{old_offset}: {what}",
                         channel=channel)
        self.old_epoch = old_epoch
        self.old_offset = old_offset
        self.new_epoch = new_epoch
        self.new_offset = new_offset


class MessagesSkipped(MessagesLost):
    """The server will not deliver offsets ``first`` to ``last`` (it sent ``gap``).

    The channel's slow-consumer policy is ``drop`` and this client fell behind. The
    subscription continues with ``last + 1``; the skipped range may still be in the
    channel's history (``GET /api/channels/{channel}/history?since=first-1``).
    """

    def __init__(self, channel: str, first: int, last: int, epoch: str | None) -> None:
        super().__init__(f"{channel!r}: the server skipped offsets {first} to {last} "
                         f"(this client fell behind on a channel with slow_consumer = drop)",
                         channel=channel)
        self.first = first
        self.last = last
        self.epoch = epoch
