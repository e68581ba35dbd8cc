"""scan_client_frames: the compiled scanner equals its Python twin, agrees with wsproto,
and gives the same frames however the stream is chunked.

Runs the properties against both implementations (the twin is always importable);
the compiled one skips without the extension unless ``RELAY_REQUIRE_COMPILED=1``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

import relay._fastpath_py as py

# (the compiled module, or a skip / a failure in CI without it; results or exceptions)
from test_fastpath_differential import compiled, cy, outcome

def types_of(value: Any) -> Any:
    """The structure of ``value`` with every leaf replaced by its exact type."""
    if isinstance(value, (tuple, list)):
        return (type(value), [types_of(v) for v in value])
    return type(value)


def same(cy_fn: Callable[..., Any], py_fn: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    got, want = outcome(cy_fn, *args), outcome(py_fn, *args)
    assert got == want, f"args={args!r}"
    if got[0] == "ok":
        assert types_of(got[1]) == types_of(want[1]), f"args={args!r}"
    return got


SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
IMPLS = ["compiled", "python"]


def impl(name: str) -> ModuleType:
    return compiled() if name == "compiled" else py


# --------------------------------------------------------------------------- frame building


def build_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0,
                mask: bytes | None = b"\x37\xfa\x21\x3d", length_form: str = "min") -> bytes:
    """One client frame. ``length_form``: "min" (shortest), "16" or "64" (forced, maybe
    non-minimal). ``mask=None``: unmasked."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)])
    mbit = 0x80 if mask is not None else 0
    if length_form == "min":
        length_form = "7" if n < 126 else "16" if n < 0x10000 else "64"
    if length_form == "7" and n < 126:
        head += bytes([mbit | n])
    elif length_form in ("7", "16") and n < 0x10000:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if mask is None:
        return head + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if n < 4096 else (
        (int.from_bytes(payload, "big")
         ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(n, "big"))
    return head + mask + masked


SIZES = [0, 1, 2, 124, 125, 126, 127, 128, 65535, 65536, 65537, 70_000]
utf8_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
payloads = st.one_of(
    st.binary(max_size=40),
    utf8_text.map(lambda s: s.encode()),
    st.sampled_from(["é€😀", "\U0010ffff", "a" * 126, "😀" * 40]).map(str.encode),
    st.sampled_from([b"\xff\xfe", b"\xc3", b"ab\xed\xa0\x80", b"\xf4\x90\x80\x80", b"x\x80"]),
    st.tuples(st.sampled_from(SIZES), st.sampled_from([b"a", b"\xa5", "é".encode(), b"\xe2"]))
    .map(lambda t: (t[1] * t[0])[: t[0]]),
)
masks = st.one_of(st.binary(min_size=4, max_size=4), st.just(b"\x00\x00\x00\x00"))

any_frame = st.builds(
    build_frame,
    opcode=st.one_of(st.integers(0, 15), st.sampled_from([1, 2, 1, 2, 8, 9, 10])),
    payload=payloads,
    fin=st.sampled_from([True, True, True, False]),
    rsv=st.sampled_from([0, 0, 0, 0, 1, 2, 4, 7]),
    mask=st.one_of(masks, masks, masks, st.none()),
    length_form=st.sampled_from(["min", "min", "min", "7", "16", "64"]),
)
MAX_SIZES = [0, 1, 125, 126, 65535, 65536, 2**63 - 1, 2**64, -1, -(2**70)]
max_sizes = st.one_of(st.sampled_from(MAX_SIZES), st.integers(-5, 80_000))


@st.composite
def streams(draw: st.DrawFn, frame: st.SearchStrategy[bytes] = any_frame) -> bytes:
    data = b"".join(draw(st.lists(frame, max_size=6)))
    if data and draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return data


# --------------------------------------------------------------------------- compiled == twin


def test_constants_agree() -> None:
    c = compiled()
    assert (c.SCAN_MORE, c.SCAN_OTHER, c.SCAN_CONTROL) == (py.SCAN_MORE, py.SCAN_OTHER, py.SCAN_CONTROL)
    assert len({py.SCAN_MORE, py.SCAN_OTHER, py.SCAN_CONTROL}) == 3


@SETTINGS
@given(data=streams(), max_size=max_sizes, as_bytearray=st.booleans())
def test_compiled_equals_twin(data: bytes, max_size: int, as_bytearray: bool) -> None:
    c = compiled()
    arg = bytearray(data) if as_bytearray else data
    same(c.scan_client_frames, py.scan_client_frames, arg, max_size)
    if as_bytearray:
        assert arg == data, "the scanner must not modify its input"


@pytest.mark.parametrize("data, max_size", [
    (None, 100), ("text", 100), (3, 100), (memoryview(b"\x81\x80abcd"), 100),
    (b"\x81\x80abcd", None), (b"\x81\x80abcd", 1.5), (b"\x81\x80abcd", "100"),
])
def test_wrong_argument_types_fail_alike(data: Any, max_size: Any) -> None:
    """Outside the typed contract (bytes or bytearray, an int) both raise the same TypeError."""
    got = same(compiled().scan_client_frames, py.scan_client_frames, data, max_size)
    assert got[0] == "raised" and got[1] is TypeError, got


def test_compiled_equals_twin_edges() -> None:
    """Hand-picked headers: every length form at every boundary, truncated everywhere."""
    c = compiled()
    samples = []
    for n in (125, 126, 127, 65535, 65536):
        for form in ("min", "16", "64"):
            samples.append(build_frame(2, b"\x01" * n, length_form=form))
    samples += [
        b"\x81\xff" + (1 << 63).to_bytes(8, "big") + b"abcd",  # top bit set
        b"\x81\xff" + (2**64 - 1).to_bytes(8, "big") + b"abcd",
        b"\x82\xff" + (2**63 - 1).to_bytes(8, "big") + b"abcd",  # legal, but huge
        b"\x89\xfe\x00\x7e" + b"abcd" + b"\x00" * 126,  # control over 125
        b"\x89\xfd" + b"abcd" + b"\x00" * 125,
        b"\x88\x80abcd", b"\x80\x80abcd", b"\x01\x80abcd", b"\x83\x80abcd", b"\x8b\x80abcd",
    ]
    for frame in samples:
        for cut in sorted({0, 1, 2, 3, 4, 5, 6, 9, 10, 13, 14, len(frame) - 1, len(frame)}):
            for max_size in MAX_SIZES:
                for arg in (frame[:cut], bytearray(frame[:cut])):
                    same(c.scan_client_frames, py.scan_client_frames, arg, max_size)


# --------------------------------------------------------------------------- against wsproto


def wsproto_events(data: bytes) -> tuple[list[Any], str | None]:
    """Feed ``data`` to a server-side wsproto connection; returns its events and how it
    failed ("raised: ...", "close <code>") or None."""
    conn = Connection(ConnectionType.SERVER)
    conn.receive_data(data)
    events = []
    try:
        for event in conn.events():
            events.append(event)
            if isinstance(event, CloseConnection) and event.code in (1002, 1007, 1009):
                return events, f"close {event.code}"
    except Exception as exc:
        return events, f"raised: {type(exc).__name__}"
    return events, None


def expected_from_wsproto(events: list[Any]) -> list[tuple[int, Any]]:
    out: list[tuple[int, Any]] = []
    for event in events:
        if isinstance(event, TextMessage):
            assert event.message_finished
            out.append((1, event.data))
        elif isinstance(event, BytesMessage):
            assert event.message_finished
            out.append((2, bytes(event.data)))
        elif isinstance(event, CloseConnection):
            out.append((8, (event.code, event.reason)))
        elif isinstance(event, Ping):
            out.append((9, bytes(event.payload)))
        elif isinstance(event, Pong):
            out.append((10, bytes(event.payload)))
        else:
            raise AssertionError(f"unexpected event {event!r}")
    return out


def scanned_as_wsproto_sees_it(frames: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """Scan results with each control frame's raw bytes parsed by wsproto."""
    out = []
    for opcode, value in frames:
        if opcode in (8, 9, 10):
            assert type(value) is bytes
            events, failure = wsproto_events(value)
            assert failure is None and len(events) == 1, (value, events, failure)
            out += expected_from_wsproto(events)
        else:
            assert type(value) is (str if opcode == 1 else bytes)
            out.append((opcode, value))
    return out


def scan_all(mod: ModuleType, data: bytes | bytearray, max_size: int) -> tuple[list[tuple[int, Any]], int, int]:
    """Scan like the reader: go on after each control frame; stop at MORE or OTHER."""
    frames: list[tuple[int, Any]] = []
    pos = 0
    while True:
        got, consumed, stop = mod.scan_client_frames(data[pos:], max_size)
        frames += got
        pos += consumed
        if stop != mod.SCAN_CONTROL:
            return frames, pos, stop
        assert got and got[-1][0] in (8, 9, 10), got


good_text = utf8_text.map(lambda s: build_frame(1, s.encode()))
good_frame = st.one_of(
    good_text, good_text,
    st.builds(lambda p, m: build_frame(2, p, mask=m), st.binary(max_size=50), masks),
    st.sampled_from([126, 127, 65535, 65536, 70_000]).map(lambda n: build_frame(1, ("é" * (n // 2) + "a" * (n % 2)).encode())),
    st.builds(lambda p: build_frame(9, p), st.binary(max_size=125)),
    st.builds(lambda p: build_frame(10, p), st.binary(max_size=125)),
)
close_frame = st.one_of(
    st.just(build_frame(8, b"")),
    st.builds(lambda c, r: build_frame(8, struct.pack("!H", c) + r.encode()[:100]),
              st.sampled_from([1000, 1001, 3000, 4999]), utf8_text),
)


@pytest.mark.parametrize("name", IMPLS)
@SETTINGS
@given(frames=st.lists(good_frame, max_size=6), close=st.one_of(st.none(), close_frame))
def test_well_formed_streams_match_wsproto(name: str, frames: list[bytes], close: bytes | None) -> None:
    mod = impl(name)
    data = b"".join(frames) + (close or b"")
    got, consumed, stop = scan_all(mod, data, 2**62)
    assert consumed == len(data)
    if close is None:
        assert stop == mod.SCAN_MORE
    events, failure = wsproto_events(data)
    assert failure is None
    assert scanned_as_wsproto_sees_it(got) == expected_from_wsproto(events)


def wsproto_rejects(frame: bytes, max_size: int) -> bool:
    """True when wsproto does not read ``frame`` as one complete, final, simple message
    of at most ``max_size`` bytes / one valid control frame."""
    events, failure = wsproto_events(frame)
    if failure is not None:
        return True
    for event in events:
        if isinstance(event, (TextMessage, BytesMessage)):
            if not event.message_finished:
                return True
            if len(event.data if isinstance(event.data, bytes) else event.data.encode()) > max_size:
                return True
    return not events


@pytest.mark.parametrize("name", IMPLS)
@SETTINGS
@given(prefix=st.lists(good_frame.filter(lambda f: f[0] & 0x0F in (1, 2)), max_size=3),
       frame=any_frame, max_size=st.sampled_from([0, 1, 125, 126, 65535, 65536, 2**62]))
def test_other_is_what_wsproto_treats_differently(name: str, prefix: list[bytes], frame: bytes,
                                                  max_size: int) -> None:
    mod = impl(name)
    head = b"".join(prefix)
    got, consumed, stop = mod.scan_client_frames(head + frame, 2**62 if max_size == 2**62 else max_size)
    if stop != mod.SCAN_OTHER:
        # the frame was taken (or is only incomplete): wsproto must accept it as simple
        if consumed == len(head) + len(frame):
            if frame[0] & 0x0F in (8, 9, 10):
                # control frames are taken on their header alone (wsproto then judges the
                # payload: a 1-byte close body, a bad close code or reason)
                assert frame[0] & 0xF0 == 0x80 and frame[1] & 0x80 and len(frame) <= 6 + 125
                assert got[-1] == (frame[0] & 0x0F, frame) and stop == mod.SCAN_CONTROL
            else:
                assert not wsproto_rejects(frame, max_size), frame[:16]
        return
    # the scan stopped inside the prefix only if a prefix frame is over max_size
    at = consumed
    starts = [0]
    for f in prefix:
        starts.append(starts[-1] + len(f))
    assert at in starts, (at, starts)
    rest = (head + frame)[at:]
    first = prefix[starts.index(at)] if at < len(head) else frame
    assert rest.startswith(first)
    assert wsproto_rejects(first, max_size), first[:16]


def test_other_examples() -> None:
    """Each reason for SCAN_OTHER, spelled out, with wsproto confirming."""
    ok = build_frame(1, b'{"a":1}')
    cases = {
        "fragment": build_frame(1, b"ab", fin=False),
        "continuation": build_frame(0, b"ab"),
        "rsv1": build_frame(1, b"ab", rsv=4),
        "rsv3": build_frame(2, b"ab", rsv=1),
        "unmasked": build_frame(1, b"ab", mask=None),
        "unknown-opcode": build_frame(3, b"ab"),
        "non-minimal-16": build_frame(1, b"ab", length_form="16"),
        "non-minimal-64": build_frame(1, b"a" * 300, length_form="64"),
        "top-bit": b"\x82\xff" + (1 << 63 | 5).to_bytes(8, "big") + b"abcd" + b"x" * 5,
        "too-big": build_frame(2, b"x" * 101),
        "invalid-utf8": build_frame(1, b"\xff\xfe"),
        "big-control": build_frame(9, b"p" * 126),
        "fragmented-ping": build_frame(9, b"p", fin=False),
    }
    for mod in (py, cy) if cy is not None else (py,):
        for reason, bad in cases.items():
            frames, consumed, stop = mod.scan_client_frames(ok + bad + ok, 100)
            assert (frames, consumed, stop) == ([(1, '{"a":1}')], len(ok), mod.SCAN_OTHER), reason
            if reason != "too-big":
                assert wsproto_rejects(bad, 100), reason
            else:
                assert wsproto_rejects(bad, 100)


# --------------------------------------------------------------------------- chunking


def scan_chunked(mod: ModuleType, chunks: list[bytes], max_size: int) -> tuple[list[tuple[int, Any]], bytes, int]:
    """Feed ``chunks`` the way the reader does: keep the unconsumed rest in a bytearray,
    append each chunk, scan again after a control frame; stop for good at SCAN_OTHER.
    Returns the frames, what is left and the last stop."""
    buf = bytearray()
    frames: list[tuple[int, Any]] = []
    stop = mod.SCAN_MORE
    for chunk in chunks:
        buf += chunk
        while True:
            got, consumed, stop = mod.scan_client_frames(buf, max_size)
            frames += got
            del buf[:consumed]
            if stop != mod.SCAN_CONTROL:
                break
        if stop == mod.SCAN_OTHER:
            break
    return frames, bytes(buf), stop


@pytest.mark.parametrize("name", IMPLS)
@SETTINGS
@given(data=streams(st.one_of(good_frame, good_frame, any_frame)), max_size=st.sampled_from([0, 125, 126, 65536, 2**62]),
       cuts=st.lists(st.integers(1, 9), min_size=1, max_size=50), big=st.booleans())
def test_chunked_scan_equals_whole_scan(name: str, data: bytes, max_size: int, cuts: list[int],
                                        big: bool) -> None:
    mod = impl(name)
    chunks, pos, i = [], 0, 0
    while pos < len(data):
        step = cuts[i % len(cuts)] * (997 if big and i % 3 == 0 else 1)
        chunks.append(data[pos:pos + step])
        pos += step
        i += 1
    whole, consumed, stop = scan_all(mod, data, max_size)
    got, rest, got_stop = scan_chunked(mod, chunks, max_size)
    assert got == whole
    assert got_stop == stop or (not chunks and stop == mod.SCAN_MORE)
    if stop == mod.SCAN_OTHER:
        # the stream was left at the same frame; the rest includes it
        assert data[consumed:].startswith(rest) or rest == data[consumed:consumed + len(rest)]
    else:
        assert rest == data[consumed:]
