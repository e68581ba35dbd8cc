# cython: language_level=3, binding=True, embedsignature=True, embedsignature.format=clinic
# cython: boundscheck=True, wraparound=True, initializedcheck=True, cdivision=False, auto_pickle=False
"""Compiled twin of ``relay._fastpath_py``: framing, outboxes, membership, fan-out.

``relay/_fastpath_py.py`` is the reference: this module has the same names,
signatures, defaults, results, exceptions and messages, and the differential tests
(``tests/test_fastpath_differential.py``) feed both the same inputs. Change both in
the same commit. Import it through :mod:`relay.fastpath`, never directly (tests and
benchmarks excepted).

Layout: exact ``int`` arguments that fit a C ``long long`` take the typed fast path;
anything else (huge ints, bools, int-likes) goes through a generic path written like
the twin, so odd inputs fail the same way in both implementations. Known, accepted
differences, all outside the typed contract in ``_fastpath.pyi``: ``Outbox`` and
``Members`` cannot be subclassed or pickled; ``Outbox.encoding`` is read-only; a
non-integer ``limit`` or ``encoding`` raises TypeError here at construction;
``Members.add`` and ``fanout`` take only this module's ``Outbox`` and ``Members``.
"""

cimport cython
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from libc.string cimport memcpy


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    enum:
        MSG_DONTWAIT
        MSG_NOSIGNAL


cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX
    const Py_ssize_t PY_SSIZE_T_MIN


IMPLEMENTATION = "cython"

# WebSocket opcodes (RFC 6455 section 5.2).
OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# Encodings a subscriber may use; index into the ``frames`` tuple of fanout().
ENC_JSON = 0
ENC_MSGPACK = 1
cdef enum:
    N_ENCODINGS_C = 2  # a C constant: sizes the per-encoding tally in flush()
N_ENCODINGS = N_ENCODINGS_C

# Slow-consumer policies.
POLICY_DISCONNECT = 0
POLICY_DROP = 1
POLICY_CONFLATE = 2

# Results of Outbox.offer().
OFFER_QUEUED = 0
OFFER_DROPPED = 1
OFFER_CONFLATED = 2
OFFER_OVERFLOW = 3
OFFER_CLOSED = 4

MAX_CONTROL_PAYLOAD = 125
_DATA_OPCODES = (OP_CONTINUATION, OP_TEXT, OP_BINARY)
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)

# The same values for C code; the module globals above are what Python sees.
cdef enum:
    _OP_BINARY = 0x2
    _OP_CLOSE = 0x8
    _OP_PONG = 0xA
    _MAX_CONTROL = 125
    _N_ENC = 2
    _POL_DISCONNECT = 0
    _POL_DROP = 1
    _POL_CONFLATE = 2
    _POL_UNKNOWN = -1
    _POL_UNDECODED = -3
    _RES_QUEUED = 0
    _RES_DROPPED = 1
    _RES_CONFLATED = 2
    _RES_OVERFLOW = 3
    _RES_CLOSED = 4


# ---------------------------------------------------------------------------
# small helpers


cdef inline bint _small_int(object value, long long* out) except -1:
    """Store ``value`` in ``out`` when it is an exact int that fits a long long."""
    cdef int overflow = 0
    if not PyLong_CheckExact(value):
        return False
    out[0] = PyLong_AsLongLongAndOverflow(value, &overflow)
    return overflow == 0


cdef Py_ssize_t _clamp_limit(object value) except? -1:
    """Return ``value`` as a Py_ssize_t, saturating ints beyond its range.

    A limit past the range can never be reached by a sum of in-memory frame
    lengths, so saturating keeps every comparison's outcome unchanged.
    """
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow > 0 or v > PY_SSIZE_T_MAX:
        return PY_SSIZE_T_MAX
    if overflow < 0 or v < PY_SSIZE_T_MIN:
        return PY_SSIZE_T_MIN
    return <Py_ssize_t>v


cdef int _policy_code(object policy) except -2:
    """Decode a policy like the twin's ``==`` chain; ``_POL_UNKNOWN`` when none matches."""
    cdef long long v
    if _small_int(policy, &v):
        if _POL_DISCONNECT <= v <= _POL_CONFLATE:
            return <int>v
        return _POL_UNKNOWN
    if policy == POLICY_CONFLATE:
        return _POL_CONFLATE
    if policy == POLICY_DROP:
        return _POL_DROP
    if policy == POLICY_DISCONNECT:
        return _POL_DISCONNECT
    return _POL_UNKNOWN


# ---------------------------------------------------------------------------
# framing


cdef int _check_header(long long opcode, long long length,
                       object opcode_obj, object length_obj) except -1:
    """Raise the twin's ValueError for a bad opcode or length (C-sized values)."""
    if _OP_CLOSE <= opcode <= _OP_PONG:
        if length > _MAX_CONTROL or length < 0:
            raise ValueError(
                f"control frame payload of {length_obj} bytes exceeds {MAX_CONTROL_PAYLOAD}"
            )
    elif opcode < 0 or opcode > _OP_BINARY:
        raise ValueError(f"unknown opcode {opcode_obj}")
    if length < 0:
        # A long long cannot exceed 2**63-1, so only the lower bound is left.
        raise ValueError(f"invalid payload length {length_obj}")
    return 0


cdef inline Py_ssize_t _header_size(unsigned long long length) noexcept nogil:
    if length < 126:
        return 2
    if length < 0x10000:
        return 4
    return 10


cdef inline void _write_header(char* out, long long opcode,
                               unsigned long long length) noexcept nogil:
    """Write the header of a final, unmasked frame; ``out`` has _header_size() bytes."""
    cdef unsigned char* p = <unsigned char*>out
    cdef int i
    p[0] = <unsigned char>(0x80 | opcode)
    if length < 126:
        p[1] = <unsigned char>length
    elif length < 0x10000:
        p[1] = 126
        p[2] = <unsigned char>(length >> 8)
        p[3] = <unsigned char>length
    else:
        p[1] = 127
        for i in range(8):
            p[2 + i] = <unsigned char>(length >> (56 - 8 * i))


def _frame_header_generic(opcode, length):
    """The twin's frame_header, line for line, for arguments off the fast path."""
    if opcode in _CONTROL_OPCODES:
        if length > MAX_CONTROL_PAYLOAD or length < 0:
            raise ValueError(
                f"control frame payload of {length} bytes exceeds {MAX_CONTROL_PAYLOAD}"
            )
    elif opcode not in _DATA_OPCODES:
        raise ValueError(f"unknown opcode {opcode}")
    if length < 0 or length > 0x7FFFFFFFFFFFFFFF:
        raise ValueError(f"invalid payload length {length}")
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 0x10000:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


def frame_header(opcode, length):
    """Return the header of a final, unmasked server frame.

    Args:
        opcode: one of the ``OP_*`` constants.
        length: payload length in bytes.

    Raises:
        ValueError: the opcode is unknown, the length is negative or over 2**63-1,
            or a control frame's payload is over 125 bytes.
    """
    cdef long long op, n
    cdef bytes out
    if _small_int(opcode, &op) and _small_int(length, &n):
        _check_header(op, n, opcode, length)
        out = PyBytes_FromStringAndSize(NULL, _header_size(<unsigned long long>n))
        _write_header(PyBytes_AS_STRING(out), op, <unsigned long long>n)
        return out
    return _frame_header_generic(opcode, length)


def encode_frame(opcode, payload):
    """Return one final, unmasked server frame holding ``payload``.

    Raises:
        ValueError: as :func:`frame_header`.
        TypeError: ``payload`` is not bytes.
    """
    cdef long long op
    cdef Py_ssize_t n, h
    cdef bytes out
    cdef char* p
    if not isinstance(payload, bytes):
        raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
    n = PyBytes_GET_SIZE(payload)
    if not _small_int(opcode, &op):
        return _frame_header_generic(opcode, n) + payload
    _check_header(op, n, opcode, n)
    h = _header_size(<unsigned long long>n)
    out = PyBytes_FromStringAndSize(NULL, h + n)
    p = PyBytes_AS_STRING(out)
    _write_header(p, op, <unsigned long long>n)
    memcpy(p + h, PyBytes_AS_STRING(payload), <size_t>n)
    return out


# ---------------------------------------------------------------------------
# batches (ticks)


cdef Py_ssize_t _payload_start(bytes frame, long long opcode) noexcept:
    """Where the payload starts when ``frame`` is exactly one final, unmasked frame
    with ``opcode`` (no extension bits), else -1."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(frame)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(frame)
    cdef unsigned long long length = 0
    cdef int i
    if n < 2 or p[0] != (0x80 | opcode) or (p[1] & 0x80):
        return -1
    if p[1] < 126:
        return 2 if n == 2 + p[1] else -1
    if p[1] == 126:
        if n < 4:
            return -1
        length = (<unsigned long long>p[2] << 8) | p[3]
        return 4 if <unsigned long long>(n - 4) == length else -1
    if n < 10:
        return -1
    for i in range(8):
        length = (length << 8) | p[2 + i]
    return 10 if <unsigned long long>(n - 10) == length else -1


cdef bytes _build_batch(long long opcode, list frames):
    """encode_batch() for frames already checked by _payload_start()."""
    cdef Py_ssize_t count = PyList_GET_SIZE(frames)
    cdef Py_ssize_t i, start, plen, total = 0, head, h, pos
    cdef bytes frame, out
    cdef char* p
    cdef unsigned char* u
    for i in range(count):
        frame = <bytes>PyList_GET_ITEM(frames, i)
        total += PyBytes_GET_SIZE(frame) - _payload_start(frame, opcode)
    if opcode == 0x1:
        head = 1
        total += 2 + (count - 1 if count else 0)
    else:
        head = 1 if count < 16 else (3 if count < 0x10000 else 5)
        total += head
    h = _header_size(<unsigned long long>total)
    out = PyBytes_FromStringAndSize(NULL, h + total)
    p = PyBytes_AS_STRING(out)
    u = <unsigned char*>p
    _write_header(p, opcode, <unsigned long long>total)
    pos = h
    if opcode == 0x1:
        p[pos] = b'['
        pos += 1
    elif count < 16:
        u[pos] = <unsigned char>(0x90 | count)
        pos += 1
    elif count < 0x10000:
        u[pos] = 0xdc
        u[pos + 1] = <unsigned char>(count >> 8)
        u[pos + 2] = <unsigned char>count
        pos += 3
    else:
        u[pos] = 0xdd
        u[pos + 1] = <unsigned char>(count >> 24)
        u[pos + 2] = <unsigned char>(count >> 16)
        u[pos + 3] = <unsigned char>(count >> 8)
        u[pos + 4] = <unsigned char>count
        pos += 5
    for i in range(count):
        frame = <bytes>PyList_GET_ITEM(frames, i)
        start = _payload_start(frame, opcode)
        plen = PyBytes_GET_SIZE(frame) - start
        if opcode == 0x1 and i:
            p[pos] = b','
            pos += 1
        memcpy(p + pos, PyBytes_AS_STRING(frame) + start, <size_t>plen)
        pos += plen
    if opcode == 0x1:
        p[pos] = b']'
    return out


def encode_batch(encoding, frames):
    """Return one frame whose payload is the array of the payloads of ``frames``.

    The payloads are already-encoded messages: for ``ENC_JSON`` the result is a text
    frame ``[p1,p2,...]``, for ``ENC_MSGPACK`` a binary frame holding a MessagePack
    array header followed by the payloads. Nothing is decoded or re-encoded.

    Args:
        encoding: ``ENC_JSON`` or ``ENC_MSGPACK``.
        frames: frames as built by :func:`encode_frame`: each exactly one final,
            unmasked text (JSON) or binary (MessagePack) frame.

    Raises:
        ValueError: the encoding is unknown, or a frame is not one complete frame of
            the encoding's opcode.
        TypeError: ``frames`` is not a list, or one of them is not bytes.
    """
    cdef long long opcode
    cdef Py_ssize_t i
    cdef object frame
    if encoding == ENC_JSON:
        opcode, kind = 0x1, "text"
    elif encoding == ENC_MSGPACK:
        opcode, kind = _OP_BINARY, "binary"
    else:
        raise ValueError(f"unknown encoding {encoding}")
    if not isinstance(frames, list):
        raise TypeError(f"frames must be a list, not {type(frames).__name__}")
    for i in range(PyList_GET_SIZE(frames)):
        frame = <object>PyList_GET_ITEM(frames, i)
        if not PyBytes_CheckExact(frame):
            raise TypeError(f"frame {i} must be bytes, not {type(frame).__name__}")
        if _payload_start(frame, opcode) < 0:
            raise ValueError(f"frame {i} is not one complete, final, unmasked {kind} frame")
    return _build_batch(opcode, frames)


# ---------------------------------------------------------------------------
# outbox


@cython.final
cdef class Outbox:
    """Outbox(limit, encoding=ENC_JSON, owner=None)
--

A connection's bounded queue of encoded frames, drained by its writer task.

    Control frames (``put``) are never dropped. Channel frames (``offer``) respect
    ``limit`` (bytes): when a frame does not fit, the channel's slow-consumer
    policy decides. Once a channel has dropped or conflated a frame, every later
    frame of that channel is dropped or conflated too until the writer drains the
    outbox with :meth:`take`, so a subscriber never sees a stale value after a
    fresh one and a gap is one contiguous range. A conflating outbox stays so
    (:attr:`behind`) until a write leaves nothing waiting: the writer and :func:`flush`
    clear it.
    """

    cdef object _limit_obj      # what the caller set, returned by .limit
    cdef Py_ssize_t _limit      # the same, saturated to Py_ssize_t for comparisons
    cdef readonly int encoding
    cdef public object owner
    cdef list _frames
    cdef Py_ssize_t _size
    cdef bint _closed
    cdef dict _conflated
    cdef dict _gaps
    cdef public Py_ssize_t dropped
    cdef public Py_ssize_t conflated
    cdef public Py_ssize_t queued
    cdef public int fd          # the socket for direct sends by flush(); -1: none
    cdef Py_ssize_t _holds
    cdef bint _dirty
    cdef bytes _rest            # what a direct send could not write; first in line
    cdef bint _batched          # start_batching() was called (ticks)
    cdef Py_ssize_t _plain      # frames at the head queued before batching began
    cdef dict _slots            # "latest" key -> index in _frames of its newest frame
    cdef public Py_ssize_t superseded
    cdef public double oldest   # stamp of the oldest channel frame waiting; 0.0: none
    cdef public bint behind     # a value was held; conflate until a write drains everything

    def __cinit__(self):
        # Containers exist before __init__ runs, so no method ever sees None.
        self._frames = []
        self._conflated = {}
        self._gaps = {}
        self._rest = b""
        self._slots = {}

    def __init__(self, limit, encoding=ENC_JSON, owner=None):
        if limit <= 0:
            raise ValueError(f"outbox limit must be > 0, got {limit}")
        if encoding < 0 or encoding >= N_ENCODINGS:
            raise ValueError(f"unknown encoding {encoding}")
        self._limit = _clamp_limit(limit)
        self._limit_obj = limit
        self.encoding = encoding
        self.owner = owner
        self._frames = []
        self._size = 0
        self._closed = False
        self._conflated = {}
        self._gaps = {}
        self.dropped = 0
        self.conflated = 0
        self.queued = 0
        self.fd = -1
        self._holds = 0
        self._dirty = False
        self._batched = False
        self._plain = 0
        self._slots = {}
        self.superseded = 0
        self.oldest = 0.0
        self.behind = False

    @property
    def holds(self):
        """How many reasons currently forbid :func:`flush` to write directly."""
        return self._holds

    def hold(self):
        """Forbid direct writes by :func:`flush` until the matching :meth:`release`.

        Whoever else writes to the socket (the connection's writer task, the
        WebSocket library sending a ping, pong or close frame) holds the outbox while
        it does, so bytes never interleave.
        """
        self._holds += 1

    def release(self):
        """Undo one :meth:`hold`.

        Raises:
            ValueError: there is no hold to release.
        """
        if self._holds <= 0:
            raise ValueError("release() without a matching hold()")
        self._holds -= 1

    def mark_dirty(self, list dirty not None):
        """Append this outbox to ``dirty`` unless it is there already; True when appended."""
        if self._dirty:
            return False
        self._dirty = True
        dirty.append(self)
        return True

    @property
    def limit(self):
        """Byte limit for channel frames (``offer``)."""
        return self._limit_obj

    @limit.setter
    def limit(self, value):
        self._limit = _clamp_limit(value)
        self._limit_obj = value

    @property
    def size(self):
        """Bytes waiting: queued frames plus held conflated values."""
        return self._size

    @property
    def closed(self):
        return self._closed

    @property
    def batched(self):
        """True once :meth:`start_batching` was called."""
        return self._batched

    def start_batching(self):
        """Send data frames in batches from now on (ticks); cannot be undone.

        :meth:`take` then returns each run of data frames (complete, final, unmasked
        frames of this encoding's opcode, as ``bytes``) as one frame whose payload is an
        array of theirs (:func:`encode_batch`); anything else (control frames such as
        pings) leaves as it is, in order, between runs. Frames queued before this call
        leave as they are. Offers and puts with a "latest" key keep only the newest frame
        of that key per batch. The outbox never joins a dirty list again: :func:`flush`
        skips it, and whoever drives the ticks writes it (:func:`flush_tick`).
        """
        if not self._batched:
            self._batched = True
            self._plain = PyList_GET_SIZE(self._frames)
            self._dirty = True

    @property
    def pending(self):
        """True when :meth:`take` or :meth:`take_gaps` has something to return."""
        return self._pending()

    cdef inline bint _pending(self) noexcept:
        return (PyBytes_GET_SIZE(self._rest) != 0
                or PyList_GET_SIZE(self._frames) != 0
                or len(self._conflated) != 0
                or len(self._gaps) != 0)

    def put(self, frame, latest=None):
        """Queue a control or direct-answer frame; never dropped, ignored once closed.

        Args:
            frame: the encoded frame.
            latest: on a batched outbox, a key (a state channel's name) whose older
                frame still waiting for the batch, or held conflated value, this frame
                replaces. Ignored when None or when the outbox is not batched.
        """
        cdef Py_ssize_t n
        if self._closed:
            return
        if latest is not None and self._batched:
            i = self._slots.get(latest)
            if i is not None:
                self._supersede(i)
            held = self._conflated.pop(latest, None)
            if held is not None:
                self._size -= len(held)
                self.superseded += 1
            self._slots[latest] = PyList_GET_SIZE(self._frames)
        self._frames.append(frame)
        n = PyBytes_GET_SIZE(frame) if PyBytes_CheckExact(frame) else len(frame)
        self._size += n
        self.queued += 1

    def offer(self, key, frame, policy, offset, latest=False, full=None, double stamp=0.0):
        """Queue a channel frame, or apply ``policy`` when it does not fit.

        Args:
            key: the channel the frame belongs to.
            frame: the encoded frame (shared between subscribers; not copied).
            policy: ``POLICY_DISCONNECT``, ``POLICY_DROP`` or ``POLICY_CONFLATE``.
            offset: the message's channel offset, for ``gap`` ranges.
            latest: on a batched outbox (ticks), keep only the newest frame of ``key``
                in a batch: an older one still waiting is taken out (a state channel).
                The policy's size check counts the bytes that removal frees.
            full: when given, what to keep instead of ``frame`` whenever the frame would
                not follow the previous frame of ``key`` on the wire: when it is held
                (conflated) or takes an older frame of ``key`` out of a batch. A delta
                channel passes the full value here and a patch as ``frame`` (a patch
                applies only right after its base). The size check uses ``frame``.
            stamp: when the message was handed out (any clock); becomes :attr:`oldest`
                when nothing else waits and the frame is queued or held.

        Returns:
            One of the ``OFFER_*`` constants. On ``OFFER_OVERFLOW`` the outbox is
            closed and emptied; the caller must close the connection (4002).
        """
        cdef int code = _POL_UNDECODED
        return self._offer(key, frame, policy, &code, offset, latest, full, stamp)

    @property
    def depth(self):
        """Frames waiting: queued (a batch's replaced values not counted) and held."""
        cdef Py_ssize_t n = PyList_GET_SIZE(self._frames) + len(self._conflated)
        if self._batched:
            n -= self._frames.count(None)
        return n

    cdef int _supersede(self, Py_ssize_t i) except -1:
        """Take the frame at index ``i`` out of the batch (a newer one of its key came)."""
        old = self._frames[i]
        self._frames[i] = None
        self._size -= PyBytes_GET_SIZE(old) if PyBytes_CheckExact(old) else len(old)
        self.superseded += 1
        return 0

    cdef int _offer(self, object key, object frame, object policy, int* code,
                    object offset, object latest, object full, double stamp) except -1:
        """offer(); ``code`` caches the decoded policy across calls (fanout)."""
        cdef int result = self._offer_frame(key, frame, policy, code, offset, latest, full)
        if (result == _RES_QUEUED or result == _RES_CONFLATED) and self.oldest == 0.0:
            self.oldest = stamp
        return result

    cdef int _offer_frame(self, object key, object frame, object policy, int* code,
                          object offset, object latest, object full) except -1:
        cdef Py_ssize_t n
        cdef Py_ssize_t slot = -1
        cdef Py_ssize_t freed = 0
        cdef object held
        cdef object found
        cdef list gap
        if self._closed:
            return _RES_CLOSED
        n = PyBytes_GET_SIZE(frame) if PyBytes_CheckExact(frame) else len(frame)
        if latest and self._batched:
            found = self._slots.get(key)
            if found is not None:
                slot = found
                held = self._frames[slot]
                freed = PyBytes_GET_SIZE(held) if PyBytes_CheckExact(held) else len(held)
        if code[0] == _POL_UNDECODED:
            code[0] = _policy_code(policy)
        if code[0] == _POL_CONFLATE:
            held = self._conflated.get(key)
            if held is not None:
                if full is not None:
                    frame = full
                    n = PyBytes_GET_SIZE(frame) if PyBytes_CheckExact(frame) else len(frame)
                if slot >= 0:
                    self._supersede(slot)
                    del self._slots[key]
                self._size += n - len(held)
                # Moved to the end: held values leave in the order of their offsets.
                del self._conflated[key]
                self._conflated[key] = frame
                self.conflated += 1
                return _RES_CONFLATED
            # Once one value is held, so is every later one (per key): the held values then
            # all come after the queued frames, so offsets never go backwards on the wire.
            # And until a write leaves nothing behind (``behind``): what a subscriber that
            # fell behind gets next is the newest value per key, not a queue of old ones.
            if len(self._conflated) != 0 or self.behind or self._size - freed + n > self._limit:
                self.behind = True
                if full is not None:
                    frame = full
                    n = PyBytes_GET_SIZE(frame) if PyBytes_CheckExact(frame) else len(frame)
                if slot >= 0:
                    self._supersede(slot)
                    del self._slots[key]
                self._conflated[key] = frame
                self._size += n
                self.conflated += 1
                return _RES_CONFLATED
        elif code[0] == _POL_DROP:
            gap = self._gaps.get(key)
            if gap is not None:
                gap[1] = offset
                self.dropped += 1
                return _RES_DROPPED
            if self._size - freed + n > self._limit:
                self._gaps[key] = [offset, offset]
                self.dropped += 1
                return _RES_DROPPED
        elif code[0] == _POL_DISCONNECT:
            if self._size - freed + n > self._limit:
                self.close()
                return _RES_OVERFLOW
        else:
            raise ValueError(f"unknown slow-consumer policy {policy}")
        if slot >= 0:
            self._supersede(slot)
            if full is not None:
                frame = full
                n = PyBytes_GET_SIZE(frame) if PyBytes_CheckExact(frame) else len(frame)
        if latest and self._batched:
            self._slots[key] = PyList_GET_SIZE(self._frames)
        self._frames.append(frame)
        self._size += n
        self.queued += 1
        return _RES_QUEUED

    def take(self):
        """Return the rest of a direct send, every queued frame, then every held conflated
        value, and empty them (:attr:`oldest` becomes 0.0).

        On a batched outbox (:meth:`start_batching`) each run of data frames among them
        leaves as one batch frame (:func:`encode_batch`).
        """
        self.oldest = 0.0
        if self._batched:
            return self._take_batch()
        cdef list frames = self._frames
        if self._conflated:
            frames.extend(self._conflated.values())
            self._conflated = {}
        self._frames = []
        self._size = 0
        rest = self._rest
        self._rest = b""
        if PyBytes_GET_SIZE(rest):
            frames.insert(0, rest)
        if not frames:
            return b""
        if PyList_GET_SIZE(frames) == 1:
            return frames[0]
        return b"".join(frames)

    cdef object _take_batch(self):
        cdef list frames = self._frames
        cdef Py_ssize_t plain = self._plain
        cdef Py_ssize_t i, n
        cdef list out
        cdef list run = []
        cdef long long opcode = _OP_BINARY if self.encoding == ENC_MSGPACK else 0x1
        cdef object frame
        if self._conflated:
            frames.extend(self._conflated.values())
            self._conflated = {}
        self._frames = []
        self._slots = {}
        self._plain = 0
        self._size = 0
        rest = self._rest
        self._rest = b""
        out = [rest] if PyBytes_GET_SIZE(rest) else []
        n = PyList_GET_SIZE(frames)
        for i in range(plain):
            out.append(<object>PyList_GET_ITEM(frames, i))
        for i in range(plain, n):
            frame = <object>PyList_GET_ITEM(frames, i)
            if frame is None:
                continue  # superseded by a newer frame of its key
            if PyBytes_CheckExact(frame) and _payload_start(frame, opcode) >= 0:
                run.append(frame)
                continue
            if PyList_GET_SIZE(run):
                out.append(_build_batch(opcode, run))
                run = []
            out.append(frame)
        if PyList_GET_SIZE(run):
            out.append(_build_batch(opcode, run))
        if not out:
            return b""
        if PyList_GET_SIZE(out) == 1:
            return out[0]
        return b"".join(out)

    cpdef written(self):
        """A write of what :meth:`take` returned has completed: when nothing waits any
        more, the subscriber keeps up again and conflation stops (:attr:`behind`)."""
        if not self._pending():
            self.behind = False

    def take_rest(self):
        """Return (and forget) what a direct send could not write."""
        rest = self._rest
        self._rest = b""
        self._size -= PyBytes_GET_SIZE(rest)
        if PyList_GET_SIZE(self._frames) == 0 and len(self._conflated) == 0:
            self.oldest = 0.0
        return rest

    def take_gaps(self):
        """Return and forget the pending gaps as ``(key, from_offset, to_offset)``."""
        if not self._gaps:
            return []
        gaps = [(key, r[0], r[1]) for key, r in self._gaps.items()]
        self._gaps = {}
        return gaps

    def close(self):
        """Discard everything waiting; later ``put`` and ``offer`` are ignored."""
        self._closed = True
        self._frames = []
        self._conflated = {}
        self._gaps = {}
        self._slots = {}
        self._plain = 0
        self._size = PyBytes_GET_SIZE(self._rest)
        self.oldest = 0.0


# ---------------------------------------------------------------------------
# membership


@cython.final
cdef class Members:
    """Members()
--

The subscribers of one channel: O(1) add, remove and membership test.

    Keeps a count per encoding so a publish encodes only what some member reads.
    """

    cdef list _items
    cdef dict _index
    cdef Py_ssize_t _counts[_N_ENC]

    def __cinit__(self):
        self._items = []
        self._index = {}

    def __init__(self):
        cdef Py_ssize_t i
        self._items = []
        self._index = {}
        for i in range(_N_ENC):
            self._counts[i] = 0

    def add(self, Outbox outbox not None):
        """Add ``outbox``; return False when it was already a member."""
        if outbox in self._index:
            return False
        self._index[outbox] = PyList_GET_SIZE(self._items)
        self._items.append(outbox)
        # encoding is read-only and validated in Outbox.__init__: always in range.
        self._counts[outbox.encoding] += 1
        return True

    def remove(self, outbox):
        """Remove ``outbox`` (swap with the last member); return False when absent."""
        cdef Py_ssize_t i
        cdef Outbox box, last
        found = self._index.pop(outbox, None)
        if found is None:
            return False
        i = found
        box = <Outbox>self._items[i]
        last = <Outbox>self._items.pop()
        if last is not box:
            self._items[i] = last
            self._index[last] = i
        self._counts[box.encoding] -= 1
        return True

    def count(self, encoding):
        """Return how many members read ``encoding``."""
        cdef long long e
        cdef Py_ssize_t i
        if _small_int(encoding, &e) and 0 <= e < _N_ENC:
            return self._counts[e]
        # Anything else is indexed like the twin's list, for the same result or error.
        return [self._counts[i] for i in range(_N_ENC)][encoding]

    def __len__(self):
        return PyList_GET_SIZE(self._items)

    def __contains__(self, outbox):
        return outbox in self._index

    def __iter__(self):
        return iter(list(self._items))


# ---------------------------------------------------------------------------
# fan-out


cdef list _frames_by_encoding(Members members, frames):
    cdef list by_encoding = [None] * _N_ENC
    cdef Py_ssize_t i
    cdef object frame
    for i in range(_N_ENC):
        if members._counts[i]:
            frame = frames[i]
            if frame is None:
                raise ValueError(f"no frame for encoding {i}")
            by_encoding[i] = frame
    return by_encoding


def fanout_into(Members members not None, frames, key, policy, offset, list dirty not None,
                latest=False, full=None, double stamp=0.0):
    """Offer one message to every member and mark each touched outbox dirty.

    Like :func:`fanout`, but instead of returning the owners to wake, appends every
    outbox that accepted something to ``dirty`` (once: see :meth:`Outbox.mark_dirty`),
    for :func:`flush` to write at the end of the batch. Batched outboxes never join
    ``dirty`` (their tick writes them); ``latest`` and ``stamp`` are passed to
    :meth:`Outbox.offer`, and so is ``full[encoding]`` when ``full`` is given (one frame
    per encoding, like ``frames``: the full value of a delta channel whose ``frames``
    hold a patch).

    Returns:
        The owners whose outbox overflowed under ``POLICY_DISCONNECT`` (close 4002).

    Raises:
        ValueError: a member's encoding has no frame in ``frames`` or in ``full``
            (nothing was offered).
    """
    cdef list overflowed = []
    cdef list by_encoding = _frames_by_encoding(members, frames)
    cdef list full_by_encoding = None if full is None else _frames_by_encoding(members, full)
    cdef object whole = None
    cdef list items = members._items
    cdef Py_ssize_t i = 0
    cdef int code = _POL_UNDECODED
    cdef int result
    cdef Outbox box
    cdef object frame
    while i < PyList_GET_SIZE(items):
        box = <Outbox>PyList_GET_ITEM(items, i)
        i += 1
        frame = <object>PyList_GET_ITEM(by_encoding, box.encoding)
        if frame is None:
            raise ValueError(f"no frame for encoding {box.encoding}")
        if full_by_encoding is not None:
            whole = <object>PyList_GET_ITEM(full_by_encoding, box.encoding)
        result = box._offer(key, frame, policy, &code, offset, latest, whole, stamp)
        if result == _RES_OVERFLOW:
            overflowed.append(box.owner)
        elif result != _RES_CLOSED and not box._dirty:
            box._dirty = True
            dirty.append(box)
    return overflowed


def flush(list dirty not None, list by_encoding=None):
    """Write each dirty outbox to its socket with one non-blocking send, then clear ``dirty``.

    An outbox is written directly only when it has a socket (``fd >= 0``), no
    :meth:`~Outbox.hold` and no pending gap (gap frames are encoded by the caller).
    What the kernel does not take stays queued, first in line. A batched outbox
    (:meth:`Outbox.start_batching`) is skipped: its tick writes it (:func:`flush_tick`).

    Args:
        dirty: the outboxes to write.
        by_encoding: when given (``N_ENCODINGS`` numbers), the bytes written to outboxes
            of each encoding are added to its entry.

    Returns:
        ``(wake, sent)``: owners whose writer task must finish the job (held, no
        socket, a gap pending, or a partial send), and the bytes written.
    """
    cdef list wake = []
    cdef long long total = 0
    cdef long long per_encoding[N_ENCODINGS_C]
    cdef int e
    for e in range(N_ENCODINGS_C):
        per_encoding[e] = 0
    cdef Py_ssize_t i
    cdef Outbox box
    for i in range(PyList_GET_SIZE(dirty)):
        box = <Outbox?>PyList_GET_ITEM(dirty, i)
        if box._batched:
            continue  # it stays "dirty" for good, so it never joins a dirty list again
        box._dirty = False
        total += _write_direct(box, wake, per_encoding)
    del dirty[:]
    if by_encoding is not None:
        for e in range(N_ENCODINGS_C):
            by_encoding[e] += per_encoding[e]
    return wake, total


cdef Py_ssize_t _write_direct(Outbox box, list wake, long long* per_encoding) except -1:
    """Write what ``box`` holds with one non-blocking send; return the bytes written."""
    cdef Py_ssize_t n, length
    cdef bytes data
    cdef double oldest
    if not box._pending():
        return 0
    if box.fd < 0 or box._holds or len(box._gaps) != 0:
        wake.append(box.owner)
        return 0
    oldest = box.oldest
    data = box.take()
    length = PyBytes_GET_SIZE(data)
    n = send(box.fd, PyBytes_AS_STRING(data), <size_t>length, MSG_DONTWAIT | MSG_NOSIGNAL)
    if n < 0:
        n = 0  # EAGAIN: the socket is full; other errors: the writer meets them too
    per_encoding[box.encoding] += n
    if n < length:
        box._rest = PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + n, length - n)
        box._size = length - n
        box.oldest = oldest  # (its oldest frame has not left entirely)
        wake.append(box.owner)
    else:
        box.written()
    return n


def flush_tick(Members members not None, list by_encoding=None):
    """Write every outbox of ``members`` that has something pending, like :func:`flush`.

    Called once per tick for the outboxes on that tick: a batched outbox's queue leaves
    as batch frames (:meth:`Outbox.take`). Same conditions and results as :func:`flush`;
    ``members`` is left as it is.
    """
    cdef list wake = []
    cdef long long total = 0
    cdef long long per_encoding[N_ENCODINGS_C]
    cdef int e
    cdef Py_ssize_t i
    cdef list items = members._items  # (nothing in here adds or removes members)
    for e in range(N_ENCODINGS_C):
        per_encoding[e] = 0
    for i in range(PyList_GET_SIZE(items)):
        total += _write_direct(<Outbox>PyList_GET_ITEM(items, i), wake, per_encoding)
    if by_encoding is not None:
        for e in range(N_ENCODINGS_C):
            by_encoding[e] += per_encoding[e]
    return wake, total


def fanout(Members members not None, frames, key, policy, offset):
    """Offer one message to every member, each getting the frame of its encoding.

    Args:
        members: the channel's subscribers.
        frames: one frame per encoding (``frames[ENC_JSON]``, ``frames[ENC_MSGPACK]``);
            an entry may be None only when no member uses that encoding.
        key, policy, offset: as :meth:`Outbox.offer`.

    Returns:
        ``(woken, overflowed)``: owners of outboxes that had nothing pending before
        and now do (their writers must be woken), and owners whose outbox
        overflowed under ``POLICY_DISCONNECT`` (they must be closed with 4002).

    Raises:
        ValueError: a member's encoding has no frame. Checked before any member
            is offered the message, so an error leaves every outbox untouched.
    """
    cdef list woken = []
    cdef list overflowed = []
    cdef list by_encoding = _frames_by_encoding(members, frames)
    cdef list items = members._items
    cdef Py_ssize_t i
    cdef int code = _POL_UNDECODED
    cdef int result
    cdef bint was_pending
    cdef Outbox box
    cdef object frame
    # The length is re-read every pass, like the twin's list iterator.
    i = 0
    while i < PyList_GET_SIZE(items):
        box = <Outbox>PyList_GET_ITEM(items, i)
        i += 1
        frame = <object>PyList_GET_ITEM(by_encoding, box.encoding)
        if frame is None:
            # Only reachable when a member's Outbox.__init__ was called again with
            # another encoding after add(); the twin raises the same there.
            raise ValueError(f"no frame for encoding {box.encoding}")
        was_pending = box._pending()
        result = box._offer(key, frame, policy, &code, offset, False, None, 0.0)
        if result == _RES_OVERFLOW:
            overflowed.append(box.owner)
        elif not was_pending and result != _RES_CLOSED:
            woken.append(box.owner)
    return woken, overflowed


# ---------------------------------------------------------------------------- client frames

SCAN_MORE = 0
SCAN_OTHER = 1
SCAN_CONTROL = 2


def scan_client_frames(data, max_size):
    """Split the complete client frames at the start of ``data``: see the twin."""
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"data must be bytes or bytearray, not {type(data).__name__}")
    if not isinstance(max_size, int):
        raise TypeError(f"max_size must be an int, not {type(max_size).__name__}")
    cdef const unsigned char[::1] buf = data
    cdef Py_ssize_t n = buf.shape[0]
    cdef Py_ssize_t pos = 0, head, end, i
    cdef unsigned char first, second, opcode
    cdef unsigned long long length
    cdef long long cap
    cdef const unsigned char* src
    cdef unsigned char* out
    cdef unsigned char mask[4]
    cdef bytes payload
    cdef list frames = []
    cdef const unsigned char* base
    if n < 2:
        return frames, 0, 0
    base = &buf[0]
    if max_size < 0:
        cap = -1
    elif max_size > 0x7FFFFFFFFFFFFFFF:
        cap = 0x7FFFFFFFFFFFFFFF
    else:
        cap = max_size
    while True:
        if n - pos < 2:
            return frames, pos, 0
        first = base[pos]
        second = base[pos + 1]
        opcode = first & 0x0F
        length = second & 0x7F
        if (first & 0xF0) != 0x80 or not (second & 0x80):
            return frames, pos, 1
        if opcode == 0x1 or opcode == 0x2:
            if length == 126:
                if n - pos < 4:
                    return frames, pos, 0
                length = (<unsigned long long>base[pos + 2] << 8) | base[pos + 3]
                if length < 126:
                    return frames, pos, 1
                head = 8
            elif length == 127:
                if n - pos < 10:
                    return frames, pos, 0
                length = 0
                for i in range(8):
                    length = (length << 8) | base[pos + 2 + i]
                if length < 65536 or (length >> 63):
                    return frames, pos, 1
                head = 14
            else:
                head = 6
            if <long long>length > cap:
                return frames, pos, 1
        elif opcode == 0x8 or opcode == 0x9 or opcode == 0xA:
            if length > 125:
                return frames, pos, 1
            head = 6
        else:
            return frames, pos, 1
        if <unsigned long long>(n - pos - head) < length or n - pos < head:
            return frames, pos, 0
        end = pos + head + <Py_ssize_t>length
        if opcode >= 0x8:
            frames.append((opcode, PyBytes_FromStringAndSize(<const char*>(base + pos), end - pos)))
            return frames, end, 2
        else:
            mask[0] = base[pos + head - 4]
            mask[1] = base[pos + head - 3]
            mask[2] = base[pos + head - 2]
            mask[3] = base[pos + head - 1]
            payload = PyBytes_FromStringAndSize(NULL, end - pos - head)
            out = <unsigned char*>PyBytes_AS_STRING(payload)
            src = base + pos + head
            for i in range(end - pos - head):
                out[i] = src[i] ^ mask[i & 3]
            if opcode == 0x1:
                try:
                    frames.append((opcode, payload.decode("utf-8")))
                except UnicodeDecodeError:
                    return frames, pos, 1
            else:
                frames.append((opcode, payload))
        pos = end
