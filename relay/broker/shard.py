"""One Redis server (or Redis Cluster master, or the master a set of Sentinels names) as
relay uses it: a pipelined command connection and a pub/sub connection, kept up for as long
as the node runs.

A :class:`Shard` connects (with Sentinels: to the master they name, asked again at every
connect), loads the two Lua scripts, reads the server's incarnation (``run_id``), pings
both connections, and when one is lost (refused, closed, killed mid-reply, silent past
``PING_TIMEOUT_SECONDS``) tells its :class:`~relay.broker.bridge.RedisBridge`, waits
(exponential backoff with jitter) and connects again. Channel work that must end with the
connection (syncs, history reads for joining subscribers) runs in the shard's
per-connection nursery (:meth:`Shard.start_soon`).
It knows nothing of channels: the bridge does.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from ..core.envelope import Ref
from ..errors import Unavailable
from .redis import ConnectionLost, Endpoint, Link, Pipeline, PubSub

if TYPE_CHECKING:
    from .bridge import RedisBridge

log = logging.getLogger("relay.broker")

#: Reconnection delays: exponential from the first to the last, each drawn uniformly
#: from [delay/2, delay] (jitter, so nodes do not reconnect in step).
BACKOFF_FIRST_SECONDS = 0.05
BACKOFF_MAX_SECONDS = 2.0
#: Both connections are pinged this often; no answer within PING_TIMEOUT_SECONDS and the
#: shard reconnects (a Redis that stopped answering is treated as down).
PING_EVERY_SECONDS = 1.0
PING_TIMEOUT_SECONDS = 3.0
#: How long one Sentinel may take to say where the master is (then the next is asked).
SENTINEL_TIMEOUT_SECONDS = 1.0
#: Commands that may wait for Redis replies per shard (publishes beyond get ``unavailable``).
MAX_PENDING_COMMANDS = 20_000
# KEYS: 1 meta hash, 2 stream. ARGV: 1 entry, 2 history size, 3 stream ttl ms, 4 epoch to
# start (when there is none, or the server's incarnation changed), 5 meta ttl ms, 6 pub/sub
# channel, 7 'publish' or 'spublish', 8 the server's incarnation (run_id). Returns {epoch, offset}.
#
# The meta hash keeps the incarnation that last wrote it (``r``). Another one means Redis
# restarted or failed over since: it may have lost a tail of writes (an older snapshot, a
# replica that had not received them), so offsets after its ``s`` may already have been
# delivered with other data. A new epoch starts there, offsets continue, and ``b`` says
# where (CHECK_INCARNATION_LUA, shared by both scripts).
CHECK_INCARNATION_LUA = """
local function current_epoch(meta, stream, new_epoch, incarnation, create)
  local m = redis.call('hmget', meta, 'e', 'r')
  if not m[1] then
    if not create then return nil, false end
    redis.call('del', meta, stream)
    redis.call('hset', meta, 'e', new_epoch, 'r', incarnation)
    return new_epoch, true
  end
  if m[2] == incarnation then return m[1], false end
  if not m[2] then  -- written before relay kept incarnations: nothing to compare with
    redis.call('hset', meta, 'r', incarnation)
    return m[1], false
  end
  redis.call('hset', meta, 'e', new_epoch, 'r', incarnation, 'b', redis.call('hget', meta, 's') or '0')
  return new_epoch, false
end
"""

PUBLISH_LUA = CHECK_INCARNATION_LUA + """
local epoch = current_epoch(KEYS[1], KEYS[2], ARGV[4], ARGV[8], true)
local offset = redis.call('hincrby', KEYS[1], 's', 1)
redis.call('xadd', KEYS[2], 'MAXLEN', ARGV[2], offset .. '-0', 'd', ARGV[1])
redis.call('pexpire', KEYS[2], ARGV[3])
redis.call('pexpire', KEYS[1], ARGV[5])
redis.call(ARGV[7], ARGV[6], epoch .. ' ' .. offset .. ' ' .. ARGV[1])
return {epoch, offset}
"""

# KEYS: 1 meta hash, 2 stream. ARGV: 1 what ('top', 'since', 'last'), 2 since offset, 3 count,
# 4 epoch to start (when there is none, or the incarnation changed), 5 meta ttl ms, 6 '1' to
# create the channel's epoch when there is none ('' = create none), 7 the server's
# incarnation. Returns {epoch or '', top, entries, base}: ``base`` is the offset after which
# the epoch began (0 unless an incarnation change started it, offsets continuing).
HISTORY_LUA = CHECK_INCARNATION_LUA + """
local epoch, created = current_epoch(KEYS[1], KEYS[2], ARGV[4], ARGV[7], ARGV[6] ~= '')
if not epoch then return {'', 0, {}, 0} end
if created then redis.call('pexpire', KEYS[1], ARGV[5]) end
local m = redis.call('hmget', KEYS[1], 's', 'b')
local top = tonumber(m[1] or '0')
local entries = {}
if ARGV[1] == 'since' then
  entries = redis.call('xrange', KEYS[2], '(' .. ARGV[2] .. '-0', '+', 'COUNT', ARGV[3])
elseif ARGV[1] == 'last' then
  entries = redis.call('xrevrange', KEYS[2], '+', '-', 'COUNT', ARGV[3])
end
return {epoch, top, entries, tonumber(m[2] or '0')}
"""


class Shard:
    """One Redis server: a pipelined command connection and a pub/sub connection,
    reconnected with backoff for as long as the bridge runs."""

    def __init__(self, bridge: RedisBridge, endpoint: Endpoint, index: int) -> None:
        self.bridge = bridge
        self.endpoint = endpoint
        self.index = index
        self.up = False
        #: Why the shard is down (None while up).
        self.problem: str | None = "not connected yet"
        #: The server the connections go to: ``endpoint``, or with Sentinels the master
        #: they named at the last connect.
        self.address = endpoint
        self.pipeline: Pipeline | None = None
        self.pubsub: PubSub | None = None
        self.publish_sha = ""
        self.history_sha = ""
        #: The Redis server's ``run_id`` on the current connection: new at every restart,
        #: and another one on a promoted replica (the scripts compare it, see PUBLISH_LUA).
        self.incarnation = ""
        self.connects = 0
        self.retired = False
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._failed: str | None = None

    def start_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a task for as long as the current connections live (cancelled with them).

        If it fails (Redis refused a command, or a bug), the shard reconnects: every
        channel is then caught up again from its stream, so no channel stays stuck.
        """
        assert self._nursery is not None
        self._nursery.start_soon(self._task, fn, args, self._nursery.cancel_scope)

    async def _task(self, fn: Callable[..., Any], args: tuple[Any, ...], scope: trio.CancelScope) -> None:
        try:
            await fn(*args)
        except Unavailable as exc:
            if self.pipeline is not None and self.pipeline.closed is None:
                log.warning("redis %s: %s; reconnecting", self.endpoint.shown, exc.message)
                self._failed = exc.message
                scope.cancel()
            # else: the connection is going away, and the session says why
        except Exception as exc:
            log.exception("redis %s: a channel task failed; reconnecting", self.endpoint.shown)
            self._failed = f"internal error: {exc!r}"
            scope.cancel()

    def unavailable(self, ref: Ref = None) -> Unavailable:
        return Unavailable(f"redis {self.endpoint.shown} unavailable: {self.problem}", ref=ref)

    def retire(self) -> None:
        """Stop this shard for good (a cluster master that is no longer one)."""
        self.retired = True
        self._scope.cancel()

    async def run(self) -> None:
        with self._scope:
            await self._run()

    async def _run(self) -> None:
        delay = BACKOFF_FIRST_SECONDS
        failures = 0
        while True:
            connects = self.connects
            try:
                reason = await self._session()
            except Exception as exc:
                # Whatever Redis or the network did that we did not foresee: logged with its
                # traceback, then handled like a lost connection (the node stays up).
                log.exception("redis %s: connection failed unexpectedly", self.endpoint.shown)
                reason = f"internal error: {exc!r}"
            if self.connects != connects:  # it was up for a while: start the backoff again
                delay, failures = BACKOFF_FIRST_SECONDS, 0
            self.problem = reason
            failures += 1
            self.bridge.topology_suspect()  # in a cluster: maybe a failover or a resharding
            wait = random.uniform(delay / 2, delay)
            level = logging.WARNING if failures == 1 else logging.DEBUG
            log.log(level, "redis %s unavailable: %s; reconnecting in %.2fs",
                    self.endpoint.shown, reason, wait)
            await trio.sleep(wait)
            delay = min(delay * 2, BACKOFF_MAX_SECONDS)

    async def _session(self) -> str:
        """Connect, serve until a connection is lost, and return why it ended."""
        node = self.bridge.node_id
        sentinels = self.endpoint.master is not None
        try:
            self.address = await self._ask_sentinels() if sentinels else self.endpoint
            cmd = await Link.open(self.address, f"relay-{node}-cmd")
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ConnectionLost) as exc:
            return _describe(exc)
        try:
            sub = await Link.open(self.address, f"relay-{node}-sub")
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ConnectionLost) as exc:
            await cmd.aclose()
            return _describe(exc)
        lost: list[str] = []
        try:
            try:
                with trio.fail_after(PING_TIMEOUT_SECONDS):
                    if sentinels and (role := (await cmd.call(("ROLE",)))[0]) != b"master":
                        raise ConnectionLost(
                            f"{self.address.host}:{self.address.port}, named master {self.endpoint.master!r} "
                            f"by the sentinels, is a {role.decode()}")
                    self.publish_sha = (await cmd.call(("SCRIPT", "LOAD", PUBLISH_LUA))).decode()
                    self.history_sha = (await cmd.call(("SCRIPT", "LOAD", HISTORY_LUA))).decode()
                    self.incarnation = _run_id(await cmd.call(("INFO", "server")))
                if not self.incarnation:
                    log.warning("redis %s: INFO server gives no run_id; a restart that loses writes "
                                "will not start a new epoch", self.endpoint.shown)
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, ConnectionLost) as exc:
                return _describe(exc)
            self.pipeline = Pipeline(cmd, MAX_PENDING_COMMANDS)
            self.pubsub = PubSub(sub, partial(self.bridge.on_message, self), sharded=self.bridge.cluster)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._guard, self.pipeline.run, lost, nursery.cancel_scope)
                nursery.start_soon(self._guard, self.pubsub.run, lost, nursery.cancel_scope)
                nursery.start_soon(self._guard, self._heartbeat, lost, nursery.cancel_scope)
                self._failed = None
                self.up, self.problem = True, None
                self.connects += 1
                if sentinels:
                    log.info("redis %s connected: master at %s:%d", self.endpoint.shown,
                             self.address.host, self.address.port)
                else:
                    log.info("redis %s connected", self.endpoint.shown)
                self.bridge.shard_up(self)
        finally:
            self.up = False
            # (said before the awaits below: /readyz may ask meanwhile)
            self.problem = lost[0] if lost else (self._failed or "connection closed")
            self._nursery = None
            if self.pipeline is not None:
                self.pipeline.close(lost[0] if lost else "connection closed")
            self.pipeline = self.pubsub = None
            self.bridge.shard_down(self)
            await cmd.aclose()
            await sub.aclose()
        return lost[0] if lost else (self._failed or "connection closed")

    async def _ask_sentinels(self) -> Endpoint:
        """Ask the Sentinels in turn where the master is (each within
        ``SENTINEL_TIMEOUT_SECONDS``); the first that names it wins.

        Raises:
            ConnectionLost: none did (the message says what each answered).
        """
        endpoint, master = self.endpoint, self.endpoint.master
        assert master is not None
        problems: list[str] = []
        for host, port in endpoint.sentinels:
            try:
                with trio.fail_after(SENTINEL_TIMEOUT_SECONDS):
                    link = await Link.open(endpoint.moved_to(host, port, sentinel=True),
                                           f"relay-{self.bridge.node_id}-sentinel")
                    try:
                        reply = await link.call(("SENTINEL", "get-master-addr-by-name", master))
                    finally:
                        await link.aclose()
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, ConnectionLost) as exc:
                problems.append(f"sentinel {host}:{port}: {_describe(exc)}")
                continue
            if not reply:
                problems.append(f"sentinel {host}:{port} knows no master {master!r}")
                continue
            return endpoint.moved_to(reply[0].decode(), int(reply[1]), endpoint.db)
        raise ConnectionLost("; ".join(problems))

    @staticmethod
    async def _guard(fn: Callable[[], Any], lost: list[str], scope: trio.CancelScope) -> None:
        try:
            await fn()
        except (OSError, ConnectionLost, Unavailable, trio.TooSlowError) as exc:
            lost.append(_describe(exc))
        except Exception as exc:
            # A bug of ours while handling what Redis sent: logged with its traceback, and
            # the shard reconnects (and catches up from the streams) instead of the node dying.
            log.exception("redis connection task failed")
            lost.append(f"internal error: {exc!r}")
        finally:
            scope.cancel()

    async def _heartbeat(self) -> None:
        assert self.pipeline is not None and self.pubsub is not None
        pipeline, pubsub = self.pipeline, self.pubsub
        while True:
            await trio.sleep(PING_EVERY_SECONDS)
            pong = pubsub.ping()
            with trio.move_on_after(PING_TIMEOUT_SECONDS) as scope:
                await pipeline.call("PING")
                await pong.wait()
            if scope.cancelled_caught:
                raise ConnectionLost(f"no answer to PING within {PING_TIMEOUT_SECONDS:g}s")


def _run_id(info: bytes) -> str:
    """The ``run_id`` in an ``INFO server`` reply ('' when the server gives none: then
    relay cannot tell its restarts apart, and the epoch changes only when keys are lost)."""
    for line in info.splitlines():
        if line.startswith(b"run_id:"):
            return line[7:].strip().decode()
    return ""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, Unavailable):
        return exc.message
    text = str(exc) or type(exc).__name__
    return text
