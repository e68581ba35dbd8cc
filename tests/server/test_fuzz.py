"""Fuzz a live server (hypothesis): random bytes, random frames and random protocol messages
from hostile clients, while a well-behaved client keeps getting its answers and deliveries,
and the server never logs a traceback or an error for bad input."""

from __future__ import annotations

import json
import logging
from typing import Any

import msgpack
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from relay.config import LimitsConfig

from .conftest import MSGPACK_PROTO, open_client, running_server

_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                       max_leaves=12)
_keys = st.sampled_from(["type", "channel", "data", "ref", "since", "token", "epoch", "offset"]) | st.text(max_size=8)
_types = st.sampled_from(["subscribe", "unsubscribe", "publish", "ping", "refresh", "welcome", "", "PING"]) | _values
_messages = st.dictionaries(_keys, _values, max_size=6).flatmap(
    lambda d: st.builds(lambda t: {**d, "type": t}, _types) | st.just(d))

#: One hostile action: a JSON text frame, a msgpack binary frame, raw text, raw bytes.
_actions = st.one_of(
    st.tuples(st.just("json"), _messages),
    st.tuples(st.just("msgpack"), _messages),
    st.tuples(st.just("text"), st.text(max_size=300)),
    st.tuples(st.just("bytes"), st.binary(max_size=300)),
)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.bad.append(record)


def _encode(kind: str, value: Any) -> str | bytes:
    if kind == "json":
        return json.dumps(value, default=str)
    if kind == "msgpack":
        try:
            return msgpack.packb(value)  # type: ignore[no-any-return]
        except (OverflowError, TypeError, ValueError):
            return b"\xc1"  # msgpack's never-used byte
    return value  # type: ignore[no-any-return]


async def _session(actions: list[tuple[str, Any]], garbage: bytes) -> None:
    limits = LimitsConfig(messages_per_second=1000, messages_burst=1000, bytes_per_second=0)
    async with running_server(limits=limits, max_message_size=4096, send_queue_size=65536) as server, \
            open_client(server) as calm, open_client(server) as publisher:
        await calm.subscribe("calm")
        for encoding in ("json", "msgpack"):
            # max_queue=None: the hostile client reads only one answer, and a bounded queue
            # would make the websockets client stop reading and never see the close frame.
            kwargs: dict[str, Any] = {"max_queue": None}
            if encoding == "msgpack":
                kwargs["subprotocols"] = [MSGPACK_PROTO]
            try:
                async with open_client(server, encoding, **kwargs) as hostile:
                    for kind, value in actions:
                        await hostile.ws.send(_encode(kind, value))
                    await hostile.request({"type": "ping", "ref": "end"})
            except (ConnectionClosed, InvalidHandshake):
                pass  # closed for a protocol violation: allowed
        # raw garbage on a fresh TCP connection
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            try:
                await stream.send_all(garbage)
                # an answer (400) comes at once; an incomplete request would wait for the
                # handshake timeout, which the test does not wait for
                with trio.move_on_after(0.05):
                    while await stream.receive_some(65536):
                        pass
            except trio.BrokenResourceError:
                pass
        # the well-behaved clients are unaffected
        ack = await publisher.request({"type": "publish", "channel": "calm", "data": {"n": 1}, "ref": 1})
        got = await calm.recv()
        if got["type"] == "ack":  # the calm client published nothing: this is the publisher's
            got = await calm.recv()
        assert ack["type"] == "ack" and got == {"type": "message", "channel": "calm", "offset": 1, "data": {"n": 1}}, (ack, got)
        assert (await calm.request({"type": "ping", "ref": 2})) == {"type": "pong", "ref": 2}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=st.lists(_actions, max_size=25), garbage=st.binary(max_size=200))
def test_hostile_input_never_hurts_others_or_logs_a_traceback(actions: list[tuple[str, Any]], garbage: bytes) -> None:
    handler = _Errors()
    relay_log = logging.getLogger("relay")
    relay_log.addHandler(handler)
    old_level = relay_log.level
    relay_log.setLevel(logging.DEBUG)
    try:
        async def main() -> None:
            with trio.fail_after(15):
                await _session(actions, garbage)
        trio.run(main)
    finally:
        relay_log.removeHandler(handler)
        relay_log.setLevel(old_level)
    assert not handler.bad, [(r.getMessage(), r.exc_info) for r in handler.bad]
