"""A naive trio-websocket broadcast server: the baseline `relay bench --peers` measures.

It speaks just enough of relay's protocol (docs/protocol.md) for the benchmark: a
`subscribe` frame joins a channel and is answered with `subscribed`; the `data` of a
`publish` frame goes to every subscriber of its channel as
`{"type":"message","channel":C,"offset":N,"data":D}`, encoded once, sent with
`for ws in subscribers: await ws.send_message(msg)` from the publisher's handler, as a
straightforward trio-websocket application would. JSON (`relay.v1.json`) only.

Not part of relay: tests must not import it. Usage: python trio_ws_broadcast.py --port 8765
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

SUBPROTOCOL = "relay.v1.json"
log = logging.getLogger("trio_ws_broadcast")


class Broadcast:
    """Channels and their subscribers, and each channel's last offset."""

    def __init__(self) -> None:
        self.subscribers: dict[str, dict[WebSocketConnection, None]] = {}
        self.offsets: dict[str, int] = {}

    async def handler(self, request: WebSocketRequest) -> None:
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in request.proposed_subprotocols else None
        ws = await request.accept(subprotocol=subprotocol)
        joined: list[str] = []
        try:
            while True:
                text = await ws.get_message()
                try:
                    msg = json.loads(text)
                    kind, channel = msg.get("type"), msg.get("channel")
                except (ValueError, AttributeError):
                    continue  # not for this benchmark server
                if not isinstance(channel, str):
                    continue
                if kind == "subscribe":
                    self.subscribers.setdefault(channel, {})[ws] = None
                    joined.append(channel)
                    await ws.send_message(json.dumps(
                        {"type": "subscribed", "channel": channel, "offset": self.offsets.get(channel, 0)}))
                elif kind == "publish":
                    offset = self.offsets[channel] = self.offsets.get(channel, 0) + 1
                    out = json.dumps({"type": "message", "channel": channel, "offset": offset,
                                      "data": msg.get("data")}, separators=(",", ":"))
                    for sub in list(self.subscribers.get(channel, ())):
                        try:
                            await sub.send_message(out)
                        except ConnectionClosed:
                            self.subscribers.get(channel, {}).pop(sub, None)
        except ConnectionClosed:
            pass  # the client left; its subscriptions are removed below
        finally:
            for channel in joined:
                self.subscribers.get(channel, {}).pop(ws, None)


async def main(port: int) -> None:
    server = Broadcast()
    # An exception escaping a handler would stop the whole server (trio-websocket), hence
    # the broad catch at this task boundary.
    async def handler(request: WebSocketRequest) -> None:
        try:
            await server.handler(request)
        except Exception:  # task boundary: log and drop this connection only
            log.exception("connection failed")

    await serve_websocket(handler, "127.0.0.1", port, ssl_context=None, max_message_size=1 << 20)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        trio.run(main, args.port)
    except KeyboardInterrupt:
        sys.exit(130)
