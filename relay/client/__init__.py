"""relay's Python client (trio): a connection that survives blips, restarts and deploys.

::

    import trio
    import relay.client

    async def main():
        async with relay.client.connect("ws://127.0.0.1:8765/ws") as c:
            sub = await c.subscribe("chat.lobby")
            ack = await c.publish("chat.lobby", {"text": "hi"})
            async for msg in sub:
                print(msg.offset, msg.data)

    trio.run(main)

The client reconnects with exponential backoff and full jitter, follows the close-code
table of the protocol, resubscribes every channel from the last message it received so
that the application sees each message once and in order, tells the application when
that was impossible (:class:`RecoveryLost`), and queues publishes while disconnected.
See docs/clients.md.
"""

from __future__ import annotations

from ._base import DEFAULT_URL as DEFAULT_URL
from ._base import ClientStatistics as ClientStatistics
from ._client import Client as Client
from ._client import connect as connect
from ._errors import AlreadySubscribed as AlreadySubscribed
from ._errors import ClientClosed as ClientClosed
from ._errors import ClientError as ClientError
from ._errors import EventsOverflow as EventsOverflow
from ._errors import InvalidData as InvalidData
from ._errors import MessagesLost as MessagesLost
from ._errors import MessagesSkipped as MessagesSkipped
from ._errors import OfflineQueueFull as OfflineQueueFull
from ._errors import PublishUnconfirmed as PublishUnconfirmed
from ._errors import RecoveryLost as RecoveryLost
from ._errors import RequestFailed as RequestFailed
from ._errors import RequestTimeout as RequestTimeout
from ._errors import SubscriptionEnded as SubscriptionEnded
from ._policy import backoff_cap as backoff_cap
from ._policy import backoff_delay as backoff_delay
from ._requests import PendingPublish as PendingPublish
from ._subscription import EventStream as EventStream
from ._subscription import Subscription as Subscription
from ._subscription import SubscriptionStatistics as SubscriptionStatistics
from ._types import Ack as Ack
from ._types import ClientState as ClientState
from ._types import Closed as Closed
from ._types import Connected as Connected
from ._types import Connecting as Connecting
from ._types import Disconnected as Disconnected
from ._types import Event as Event
from ._types import Join as Join
from ._types import Leave as Leave
from ._types import Lost as Lost
from ._types import Member as Member
from ._types import Message as Message
from ._types import Poke as Poke
from ._types import Position as Position
from ._types import PresenceStats as PresenceStats
from ._types import Reconnecting as Reconnecting
from ._types import Subscribed as Subscribed

__all__ = [
    "DEFAULT_URL", "connect", "Client", "ClientStatistics", "Subscription",
    "SubscriptionStatistics", "PendingPublish", "EventStream",
    "Message", "Poke", "Ack", "Position", "ClientState",
    "Event", "Connecting", "Connected", "Disconnected", "Reconnecting", "Subscribed", "Lost", "Closed",
    "Member", "PresenceStats", "Join", "Leave",
    "ClientError", "ClientClosed", "OfflineQueueFull", "InvalidData", "AlreadySubscribed",
    "RequestTimeout", "RequestFailed", "PublishUnconfirmed", "SubscriptionEnded", "EventsOverflow",
    "MessagesLost", "RecoveryLost", "MessagesSkipped",
    "backoff_delay", "backoff_cap",
]
