"""A Python `websockets` broadcast server (asyncio), a peer for `relay bench --peers`.

It speaks just enough of relay's protocol (docs/protocol.md) for the benchmark: a
`subscribe` frame joins a channel and is answered with `subscribed`; the `data` of a
`publish` frame goes to every subscriber of its channel as
`{"type":"message","channel":C,"offset":N,"data":D}`, encoded once and handed to
`websockets.broadcast()`, the library's recommended fan-out. Note that `broadcast()`
skips a connection whose write buffer is above its high-water mark: under overload this
server drops messages, which the load generator reports as loss (offset gaps).
JSON (`relay.v1.json`) only; no compression (none is offered by the load generator).

Not part of relay: tests must not import it. Usage: python websockets_broadcast.py --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

SUBPROTOCOL = "relay.v1.json"

subscribers: dict[str, set[ServerConnection]] = {}
offsets: dict[str, int] = {}


async def handler(ws: ServerConnection) -> None:
    joined: list[str] = []
    try:
        async for text in ws:
            try:
                msg = json.loads(text)
                kind, channel = msg.get("type"), msg.get("channel")
            except (ValueError, AttributeError):
                continue  # not for this benchmark server
            if not isinstance(channel, str):
                continue
            if kind == "subscribe":
                subscribers.setdefault(channel, set()).add(ws)
                joined.append(channel)
                await ws.send(json.dumps({"type": "subscribed", "channel": channel, "offset": offsets.get(channel, 0)}))
            elif kind == "publish":
                offset = offsets[channel] = offsets.get(channel, 0) + 1
                out = json.dumps({"type": "message", "channel": channel, "offset": offset, "data": msg.get("data")},
                                 separators=(",", ":"))
                broadcast(subscribers.get(channel, ()), out)
    except ConnectionClosed:
        pass  # the client left; its subscriptions are removed below
    finally:
        for channel in joined:
            subscribers.get(channel, set()).discard(ws)


async def main(port: int) -> None:
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with serve(handler, "127.0.0.1", port, subprotocols=[SUBPROTOCOL], compression=None, max_size=1 << 20):
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        asyncio.run(main(args.port))
    except KeyboardInterrupt:
        sys.exit(130)
