"""Pick the compiled hot path (``relay._fastpath``) or its pure-Python twin.

``RELAY_PURE_PYTHON=1`` forces the twin; otherwise the Cython extension is used
when it was built. ``IMPLEMENTATION`` says which one is active ("cython" or
"python"). Everything else in relay imports the hot path from here.
"""

from __future__ import annotations

import os

if os.environ.get("RELAY_PURE_PYTHON", "") not in ("", "0"):
    from . import _fastpath_py as _impl
else:
    try:
        from . import _fastpath as _impl  # type: ignore[no-redef]
    except ImportError:
        from . import _fastpath_py as _impl  # type: ignore[no-redef]

IMPLEMENTATION: str = _impl.IMPLEMENTATION

OP_CONTINUATION = _impl.OP_CONTINUATION
OP_TEXT = _impl.OP_TEXT
OP_BINARY = _impl.OP_BINARY
OP_CLOSE = _impl.OP_CLOSE
OP_PING = _impl.OP_PING
OP_PONG = _impl.OP_PONG
ENC_JSON = _impl.ENC_JSON
ENC_MSGPACK = _impl.ENC_MSGPACK
N_ENCODINGS = _impl.N_ENCODINGS
POLICY_DISCONNECT = _impl.POLICY_DISCONNECT
POLICY_DROP = _impl.POLICY_DROP
POLICY_CONFLATE = _impl.POLICY_CONFLATE
OFFER_QUEUED = _impl.OFFER_QUEUED
OFFER_DROPPED = _impl.OFFER_DROPPED
OFFER_CONFLATED = _impl.OFFER_CONFLATED
OFFER_OVERFLOW = _impl.OFFER_OVERFLOW
OFFER_CLOSED = _impl.OFFER_CLOSED
SCAN_MORE = _impl.SCAN_MORE
SCAN_OTHER = _impl.SCAN_OTHER
SCAN_CONTROL = _impl.SCAN_CONTROL

frame_header = _impl.frame_header
encode_frame = _impl.encode_frame
encode_batch = _impl.encode_batch
Outbox = _impl.Outbox
Members = _impl.Members
fanout = _impl.fanout
fanout_into = _impl.fanout_into
flush = _impl.flush
flush_tick = _impl.flush_tick
scan_client_frames = _impl.scan_client_frames

__all__ = [
    "IMPLEMENTATION", "OP_CONTINUATION", "OP_TEXT", "OP_BINARY", "OP_CLOSE", "OP_PING",
    "OP_PONG", "ENC_JSON", "ENC_MSGPACK", "N_ENCODINGS", "POLICY_DISCONNECT",
    "POLICY_DROP", "POLICY_CONFLATE", "OFFER_QUEUED", "OFFER_DROPPED", "OFFER_CONFLATED",
    "OFFER_OVERFLOW", "OFFER_CLOSED", "frame_header", "encode_frame", "encode_batch", "Outbox", "Members",
    "fanout", "fanout_into", "flush", "flush_tick", "SCAN_MORE", "SCAN_OTHER", "SCAN_CONTROL",
    "scan_client_frames",
]
