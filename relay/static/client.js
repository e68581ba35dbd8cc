// relay browser client: an ES module with no dependencies and no build step.
//
//   import { Relay } from "http://HOST:PORT/client.js";
//   const relay = new Relay("ws://HOST:PORT/ws", { token });
//   relay.addEventListener("status", (e) => show(e.detail));
//   const sub = relay.subscribe("chat.42", (msg) => render(msg.data, msg.offset));
//   const ack = await relay.publish("chat.42", { text: "hi" });
//   sub.unsubscribe(); relay.close();
//
// It behaves like relay's Python client (docs/clients.md): reconnects with exponential
// backoff and full jitter, follows the close-code table, resubscribes with `since` so each
// message is delivered once and in order (or a "lost" event says what could not be), keeps a
// bounded queue of publishes made while disconnected, and reports its state as events.
// Where WebSocket is blocked it falls back to Server-Sent Events (GET /sse) plus HTTP
// publishes (POST /publish), then to long-polling (GET /poll), and probes its way back up.

const TRANSPORTS = ["websocket", "sse", "poll"];
const SUBPROTOCOL = "relay.v1.json";
const NO_RECONNECT = new Set([1000, 1008]);
const LONGER_BACKOFF = new Set([1013, 4003]);
const CLOSE_TOKEN_EXPIRED = 4001;
const CLOSE_GOING_AWAY = 1001;
const CLOSE_ABNORMAL = 1006;
const LONGER_BACKOFF_STEPS = 3;
const STABLE_CONNECTION_MS = 5000;

const DEFAULTS = {
  token: null,             // a JWT: ?token= on WebSocket and SSE, Authorization: Bearer on fetch
  tokenCallback: null,     // async () => newToken, called after close 4001 or HTTP 401
  encoding: "json",        // the browser client speaks JSON only
  minBackoff: 100,         // ms; reconnection attempt n waits a random time in
  maxBackoff: 30000,       //   [0, min(maxBackoff, minBackoff * backoffFactor ** (n - 1))]
  backoffFactor: 2,
  maxOfflineQueue: 1000,   // publishes that may wait while disconnected
  requestTimeout: 10000,   // ms to wait for an answer once a request was sent
  connectTimeout: 10000,   // ms for a transport to open (WebSocket welcome, SSE welcome, first poll)
  pingTimeout: 10000,      // ms: no sign of life for heartbeat + this: the connection is dead
  transports: TRANSPORTS,  // the fallback chain, best first
  fallbackAfter: 2,        // failed attempts of a transport (while HTTP works) before the next one
  probeInterval: 30000,    // ms between attempts to move back up the chain
  pollTimeout: 25000,      // ms a poll may wait on the server (the server caps it at poll_timeout)
  httpUrl: null,           // base URL of the HTTP endpoints; default: derived from the WebSocket URL
  tickMs: 0,               // > 0: ask the server for ticks (?tick_ms=N, WebSocket only): one frame per tick
};

/** The tick intervals the server accepts (ms; relay/server/ws.py MIN_TICK_MS, MAX_TICK_MS). */
const MIN_TICK_MS = 10;
const MAX_TICK_MS = 1000;

/** How many of a subscription's latest end-to-end latencies `latency()` summarises. */
const LATENCY_WINDOW = 1024;

/** Unix time in milliseconds with sub-millisecond precision where the browser gives it. */
const nowMs = () => (globalThis.performance && performance.timeOrigin ? performance.timeOrigin + performance.now() : Date.now());

/** Base class of every error this module rejects or throws with. */
export class RelayError extends Error {
  constructor(message, details = {}) {
    super(message);
    this.name = new.target.name;
    Object.assign(this, details);
  }
}
/** The client stopped for good (closed by you, 1000, 1008, a refused token...). */
export class ClientClosed extends RelayError {}
/** A publish while disconnected found maxOfflineQueue publishes already waiting. */
export class OfflineQueueFull extends RelayError {}
/** The server answered a request with an error: `code` is bad_request, forbidden, rate_limited... */
export class RequestFailed extends RelayError {}
/** No answer within requestTimeout: the publish may or may not have happened. */
export class RequestTimeout extends RelayError {}
/** The connection ended after a publish was sent and before its ack: it may or may not have happened. */
export class PublishUnconfirmed extends RelayError {}
/** Data that not every subscriber could receive (undefined, NaN, functions, BigInt...). */
export class InvalidData extends RelayError {}

function backoffCap(attempt, o) {
  return Math.min(o.maxBackoff, o.minBackoff * o.backoffFactor ** Math.min(Math.max(attempt - 1, 0), 64));
}

/** The delay of reconnection attempt `attempt` (1, 2, ...): full jitter. */
export function backoffDelay(attempt, options, rand = Math.random) {
  return rand() * backoffCap(attempt, { ...DEFAULTS, ...options });
}

function reconnectHint(reason) {
  try {
    const ms = JSON.parse(reason).reconnect_after_ms;
    return typeof ms === "number" && ms >= 0 && Number.isFinite(ms) ? ms : null;
  } catch {
    return null;
  }
}

/** What to do after a close code (PROTOCOL.md): {action: "reconnect"|"refresh"|"stop", hint, longer}. */
export function decideClose(code, reason) {
  if (NO_RECONNECT.has(code)) return { action: "stop" };
  if (code === CLOSE_TOKEN_EXPIRED) return { action: "refresh" };
  if (code === CLOSE_GOING_AWAY) return { action: "reconnect", hint: reconnectHint(reason) };
  return { action: "reconnect", longer: LONGER_BACKOFF.has(code) };
}

function decideHttp(status, retryAfter) {
  const hint = /^\d+$/.test(retryAfter || "") ? Number(retryAfter) * 1000 : null;
  if (status === 401) return { action: "refresh" };
  if (status === 429) return { action: "reconnect", hint, longer: true };
  if (status === 408 || status >= 500) return { action: "reconnect", hint };
  return { action: "stop" };
}

function checkData(value, depth = 0) {
  if (depth > 64) throw new InvalidData("data is nested deeper than 64 levels");
  if (value === null || typeof value === "string" || typeof value === "boolean") return;
  if (typeof value === "number") {
    if (!Number.isFinite(value)) throw new InvalidData(`data holds ${value}, which JSON cannot carry`);
    return;
  }
  if (Array.isArray(value)) { value.forEach((v) => checkData(v, depth + 1)); return; }
  if (typeof value === "object" && Object.getPrototypeOf(value) === Object.prototype) {
    for (const v of Object.values(value)) checkData(v, depth + 1);
    return;
  }
  throw new InvalidData(`data holds a ${typeof value === "object" ? value.constructor?.name : typeof value}, ` +
    "which is not JSON (use objects, arrays, strings, finite numbers, booleans and null)");
}

/** RFC 7386 JSON Merge Patch: `target` patched by `patch`; neither is changed (untouched parts are shared). */
export function applyMergePatch(target, patch) {
  if (patch === null || typeof patch !== "object" || Array.isArray(patch)) return patch;
  const result = (target !== null && typeof target === "object" && !Array.isArray(target)) ? { ...target } : {};
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete result[key];
    else {
      const next = applyMergePatch(Object.prototype.hasOwnProperty.call(result, key) ? result[key] : undefined, value);
      // (defineProperty: a member named "__proto__" stays a member, as JSON.parse makes it)
      Object.defineProperty(result, key, { value: next, enumerable: true, writable: true, configurable: true });
    }
  }
  return result;
}

function copyValue(value) {
  if (value === null || typeof value !== "object") return value;
  return typeof structuredClone === "function" ? structuredClone(value) : JSON.parse(JSON.stringify(value));
}

function checkChannel(channel) {
  if (typeof channel !== "string" || !channel || /[\s\x00-\x1f\x7f]/.test(channel)) {
    throw new TypeError(`channel must be a non-empty string without whitespace, got ${JSON.stringify(channel)}`);
  }
}

function parseSince(since) {
  if (since == null) return null;
  if (typeof since === "string") {
    const m = /^([^:,\s]+):(\d+)$/.exec(since);
    if (!m) throw new TypeError(`since must be "EPOCH:OFFSET", got ${JSON.stringify(since)}`);
    return { epoch: m[1], offset: Number(m[2]) };
  }
  if (typeof since.epoch === "string" && Number.isInteger(since.offset) && since.offset >= 0) {
    return { epoch: since.epoch, offset: since.offset };
  }
  throw new TypeError("since must be \"EPOCH:OFFSET\" or {epoch, offset}");
}

/** One subscription's place in its channel: what to send as since, what is a duplicate. */
class Cursor {
  constructor(channel, since) {
    this.channel = channel;
    this.epoch = since ? since.epoch : null;
    this.offset = since ? since.offset : null;
    this.base = null;
  }

  since() {
    if (this.epoch === null) return null;
    const offset = this.offset !== null ? this.offset : this.base;
    return offset === null ? null : { epoch: this.epoch, offset };
  }

  onSubscribed(asked, epoch, offset, recovered) {
    let lost = null;
    if (asked && !recovered) {
      lost = { kind: "recovery", channel: this.channel, oldEpoch: asked.epoch, oldOffset: asked.offset,
               newEpoch: epoch, newOffset: offset };
    }
    if (!asked || epoch !== asked.epoch) { this.epoch = epoch; this.offset = null; }
    this.base = offset;
    return lost;
  }

  onMessage(offset, epoch) {
    if (epoch && this.epoch && epoch !== this.epoch) {
      const last = this.offset !== null ? this.offset : (this.base || 0);
      const lost = { kind: "recovery", channel: this.channel, oldEpoch: this.epoch, oldOffset: last,
                     newEpoch: epoch, newOffset: offset - 1 };
      this.epoch = epoch; this.offset = offset;
      return { deliver: true, lost };
    }
    if (epoch && !this.epoch) this.epoch = epoch;
    if (this.offset !== null && offset <= this.offset) return { deliver: false, lost: null };
    this.offset = offset;
    return { deliver: true, lost: null };
  }

  onGap(first, last) {
    if (this.offset !== null && last <= this.offset) return null;
    this.offset = last;
    return { kind: "gap", channel: this.channel, epoch: this.epoch, first, last };
  }
}

/** A subscription: from relay.subscribe(). */
export class Subscription {
  constructor(relay, channel, onMessage, options) {
    this.channel = channel;
    this._relay = relay;
    this._onMessage = onMessage;
    this._onLost = options.onLost || null;
    this._onError = options.onError || null;
    this._cursor = new Cursor(channel, parseSince(options.since));
    this._asked = null;        // the since sent with the last (re)subscribe
    this._active = true;
    this.delivered = 0;
    this.duplicates = 0;
    this._latencies = [];      // ring of the latest LATENCY_WINDOW latencies (ms)
    this._nextLatency = 0;
    // Deltas (state channels with delta = true): whether the server sends them to this
    // subscription, the channel's value as of _valueAt {epoch, offset} (private: onMessage
    // gets copies), and whether a resubscription for the full value is under way.
    this._delta = false;
    this._value = undefined;
    this._valueAt = null;
    this._resyncing = false;
    this.resyncs = 0;
    this.ready = new Promise((resolve, reject) => { this._resolve = resolve; this._reject = reject; });
    this.ready.catch(() => {});  // (a page that never awaits `ready` gets no unhandled rejection)
  }

  /** The channel's epoch as of the last `subscribed` (null before the first). */
  get epoch() { return this._cursor.epoch; }

  /** Where this subscription resumes from, as "EPOCH:OFFSET" (null before the first message). */
  get position() {
    const s = this._cursor.since();
    return s ? `${s.epoch}:${s.offset}` : null;
  }

  get active() { return this._active; }

  /**
   * End-to-end latency of the latest messages (up to 1,024): from the server's publish
   * stamp (`ts`) to their arrival here, in milliseconds, as {count, p50, p99, max}; null
   * before the first stamped message. Across machines it is as good as their clocks agree.
   */
  latency() {
    const n = this._latencies.length;
    if (!n) return null;
    const sorted = [...this._latencies].sort((a, b) => a - b);
    return { count: n, p50: sorted[Math.floor((n - 1) / 2)], p99: sorted[Math.min(n - 1, Math.floor((n * 99) / 100))], max: sorted[n - 1] };
  }

  _recordLatency(ms) {
    if (this._latencies.length < LATENCY_WINDOW) this._latencies.push(ms);
    else this._latencies[this._nextLatency] = ms;
    this._nextLatency = (this._nextLatency + 1) % LATENCY_WINDOW;
  }

  /** Leave the channel: no more messages are delivered. */
  unsubscribe() {
    if (!this._active) return;
    this._active = false;
    this._relay._unsubscribe(this);
    this._reject(new RelayError(`unsubscribed from ${JSON.stringify(this.channel)}`));
  }

  _fail(error) {
    this._active = false;
    this._reject(error);
    if (this._onError) this._relay._call(this._onError, error);
  }
}

// -------------------------------------------------------------------------- transports

/** WebSocket: everything over one socket; requests matched to answers by ref. */
class WebSocketTransport {
  constructor(relay) {
    this.relay = relay;
    this.name = "websocket";
    this.opened = false;
    this.ended = false;
    this.pending = new Map();  // ref -> {resolve, reject, timer}
  }

  start() {
    const r = this.relay;
    let url = r.url;
    if (r._token) url += (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(r._token);
    if (r.options.tickMs) url += (url.includes("?") ? "&" : "?") + "tick_ms=" + r.options.tickMs;
    let ws;
    try {
      ws = this.ws = new WebSocket(url, [SUBPROTOCOL]);
    } catch (error) {
      queueMicrotask(() => this.end({ code: null, reason: String(error) }));
      return;
    }
    this.timer = setTimeout(() => this.abort(CLOSE_ABNORMAL, `no welcome within connectTimeout=${r.options.connectTimeout}ms`),
                            r.options.connectTimeout);
    ws.onmessage = (e) => {
      let parsed;
      try { parsed = JSON.parse(e.data); } catch { this.abort(1002, "undecodable message from the server"); return; }
      this.alive();
      // A ticked connection or channel sends an array of messages, in order (a channel's
      // tick inside a connection's tick: an array in the array).
      const each = (item) => {
        if (this.ended) return;
        if (Array.isArray(item)) item.forEach(each);
        else this.receive(item);
      };
      each(parsed);
    };
    ws.onclose = (e) => this.end({ code: this.opened ? e.code : null, reason: e.reason || (this.opened ? "connection lost" : "the WebSocket did not open") });
  }

  /** One message from the server. */
  receive(msg) {
    const r = this.relay;
    if (msg === null || typeof msg !== "object") { this.abort(1002, "a message from the server is not an object"); return; }
    if (msg.type === "welcome") {
      clearTimeout(this.timer);
      this.heartbeat = (msg.heartbeat > 0 ? msg.heartbeat * 1000 : 25000);
      this.opened = true;
      this.pinger = setInterval(() => this.ping(), this.heartbeat);
      r._opened(this, msg);
    } else if (msg.type === "pong") {
      this.answer(msg);
    } else if (msg.ref !== undefined && this.pending.has(msg.ref)) {
      this.answer(msg);
    } else {
      r._handle(this, msg);
    }
  }

  alive() { this.lastSeen = Date.now(); }

  ping() {
    if (this.awaitingPong) return;
    this.awaitingPong = true;
    this.request({ type: "ping" }).then(() => { this.awaitingPong = false; }, () => {});
    this.pongTimer = setTimeout(() => {
      if (this.awaitingPong) this.abort(CLOSE_ABNORMAL, `no pong within pingTimeout=${this.relay.options.pingTimeout}ms`);
    }, this.relay.options.pingTimeout);
  }

  send(message) { this.ws.send(JSON.stringify(message)); }

  request(message) {
    const ref = this.relay._nextRef++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        reject(new RequestTimeout(`no answer within requestTimeout=${this.relay.options.requestTimeout}ms; ` +
                                  "a publish may or may not have happened"));
      }, this.relay.options.requestTimeout);
      this.pending.set(ref, { resolve, reject, timer, message });
      this.send({ ...message, ref });
    });
  }

  answer(msg) {
    const p = this.pending.get(msg.ref);
    if (!p) return;
    this.pending.delete(msg.ref);
    clearTimeout(p.timer);
    if (msg.type === "error") p.reject(new RequestFailed(msg.message, { code: msg.code, channel: p.message.channel }));
    else p.resolve(msg);
    if (msg.type === "subscribed" || msg.type === "error") this.relay._handle(this, msg, p.message);
  }

  subscribe(sub) {
    const since = sub._cursor.since();
    sub._asked = since;
    const message = { type: "subscribe", channel: sub.channel, delta: true };  // this client applies patches
    if (since) message.since = since;
    this.request(message).catch(() => {});  // (answers are handled in answer())
  }

  unsubscribe(sub) { this.request({ type: "unsubscribe", channel: sub.channel }).catch(() => {}); }

  publish(channel, data) {
    return this.request({ type: "publish", channel, data }).then(
      (ack) => ({ channel: ack.channel, offset: ack.offset, epoch: ack.epoch }));
  }

  abort(code, reason) {
    this.closeInfo = { code, reason };
    try { this.ws.close(); } catch { /* already closing */ }
    this.end({ code: this.opened ? code : null, reason });
  }

  close() { try { this.ws && this.ws.close(1000, "client closed"); } catch { /* already closed */ } }

  shutdown(info) {
    this.close();
    this.end(info);
  }

  end(info) {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.timer); clearInterval(this.pinger); clearTimeout(this.pongTimer);
    if (this.ws) { this.ws.onmessage = this.ws.onclose = null; }
    for (const [ref, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(p.message.type === "publish"
        ? new PublishUnconfirmed(`the connection ended (${info.code} ${info.reason}) after the publish to ` +
                                 `${JSON.stringify(p.message.channel)} was sent and before its ack; it may or may not have happened`,
                                 { channel: p.message.channel, code: info.code })
        : new RelayError("the connection ended"));
      this.pending.delete(ref);
    }
    this.relay._ended(this, this.closeInfo && this.opened ? { ...info, ...this.closeInfo } : info);
  }
}

/** Base of the two HTTP transports: publishes go out as POST /publish, one at a time. */
class HttpTransport {
  constructor(relay) {
    this.relay = relay;
    this.opened = false;
    this.ended = false;
    this.aborts = new Set();
  }

  query(subs, withSince) {
    const params = new URLSearchParams();
    for (const sub of subs) params.append("channel", sub.channel);
    if (withSince) {
      const since = subs.map((sub) => { sub._asked = sub._cursor.since(); return sub._asked; });
      if (since.some((s) => s)) for (const s of since) params.append("since", s ? `${s.epoch}:${s.offset}` : "");
    }
    return params;
  }

  /** fetch() under this transport: aborted when it ends, or after `timeout` ms. */
  async fetch(path, init, timeout) {
    const controller = new AbortController();
    this.aborts.add(controller);
    const timer = setTimeout(() => controller.abort(), timeout);
    const headers = { ...(init.headers || {}) };
    if (this.relay._token) headers.Authorization = `Bearer ${this.relay._token}`;
    try {
      const response = await fetch(this.relay.httpUrl + path, { ...init, headers, signal: controller.signal, cache: "no-store" });
      return { response, body: await response.json().catch(() => ({})) };
    } finally {
      clearTimeout(timer);
      this.aborts.delete(controller);
    }
  }

  async publish(channel, data) {
    let response, body;
    try {
      ({ response, body } = await this.fetch("/publish", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ channel, data }),
      }, this.relay.options.requestTimeout));
    } catch (error) {
      throw new PublishUnconfirmed(`the publish to ${JSON.stringify(channel)} got no answer (${error}); ` +
                                   "it may or may not have happened", { channel });
    }
    if (response.ok) return { channel: body.channel, offset: body.offset, epoch: body.epoch };
    const error = new RequestFailed(body.message || `HTTP ${response.status}`,
                                    { code: body.error || `http_${response.status}`, channel, status: response.status });
    if (response.status === 401) this.finish({ code: null, reason: body.message, httpStatus: 401 });
    throw error;
  }

  subscribe() { this.restart(); }
  unsubscribe() { this.restart(); }

  /** Take a refusal of the channel set: a 403 naming a channel fails that subscription only. */
  refused(status, body) {
    if (status === 403 && body.channel) {
      const sub = this.relay._subs.get(body.channel);
      if (sub) {
        this.relay._subs.delete(body.channel);
        sub._fail(new RequestFailed(body.message, { code: body.error, channel: body.channel }));
      }
      return true;
    }
    return false;
  }

  finish(info) {
    if (this.ended) return;
    this.ended = true;
    this.stop();
    this.aborts.forEach((c) => c.abort());
    this.relay._ended(this, info);
  }

  close() { this.finish({ code: 1000, reason: "client closed" }); }
  shutdown(info) { this.finish(info); }
  abort(code, reason) { this.finish({ code: this.opened ? code : null, reason }); }
}

/** Server-Sent Events for receiving; HTTP POST for publishing. */
class SseTransport extends HttpTransport {
  constructor(relay) { super(relay); this.name = "sse"; }

  start() { this.open(); }

  open() {
    const r = this.relay;
    const subs = [...r._subs.values()];
    const params = this.query(subs, true);
    if (r._token) params.append("token", r._token);
    const es = this.es = new EventSource(`${r.httpUrl}/sse?${params}`);
    let welcomed = false;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.abort(CLOSE_ABNORMAL, `no welcome within connectTimeout=${r.options.connectTimeout}ms`),
                            r.options.connectTimeout);
    const on = (kind, handler) => es.addEventListener(kind, (e) => {
      if (es !== this.es) return;  // a stream replaced by open() meanwhile
      this.alive();
      let msg;
      try { msg = JSON.parse(e.data); } catch { this.abort(1002, "undecodable event from the server"); return; }
      handler(msg);
    });
    on("welcome", (msg) => {
      welcomed = true;
      clearTimeout(this.timer);
      this.heartbeat = msg.heartbeat > 0 ? msg.heartbeat * 1000 : 25000;
      this.watch();
      if (!this.opened) { this.opened = true; r._opened(this, msg); }
    });
    for (const kind of ["subscribed", "message", "poke", "gap", "unsubscribed"]) on(kind, (msg) => r._handle(this, msg));
    on("ping", () => {});
    on("close", (msg) => this.finish({ code: msg.code, reason: msg.reason }));
    es.onerror = () => {
      if (es !== this.es) return;
      // EventSource would reconnect by itself; this client decides instead (backoff, close codes).
      this.finish({ code: welcomed ? CLOSE_ABNORMAL : null, reason: welcomed ? "event stream lost" : "the event stream did not open" });
    };
  }

  alive() { this.lastSeen = Date.now(); }

  watch() {
    clearInterval(this.watchdog);
    const limit = this.heartbeat + this.relay.options.pingTimeout;
    this.watchdog = setInterval(() => {
      if (Date.now() - this.lastSeen > limit) this.abort(CLOSE_ABNORMAL, `no event for ${limit}ms`);
    }, Math.min(limit, 1000));
  }

  restart() {
    if (this.ended) return;
    const old = this.es;
    this.es = null;
    if (old) old.close();
    this.open();
  }

  stop() {
    clearTimeout(this.timer);
    clearInterval(this.watchdog);
    if (this.es) { this.es.close(); this.es = null; }
  }
}

/** Long-polling: GET /poll in a loop, each asking for what is newer than the last positions. */
class PollTransport extends HttpTransport {
  constructor(relay) { super(relay); this.name = "poll"; this.generation = 0; }

  start() { this.loop(); }

  restart() {
    if (this.ended) return;
    this.generation += 1;
    this.aborts.forEach((c) => c.abort());
  }

  stop() {}

  async loop() {
    const r = this.relay;
    while (!this.ended) {
      const generation = this.generation;
      const subs = [...r._subs.values()];
      const params = this.query(subs, true);
      const wait = this.opened ? r.options.pollTimeout : 0;
      params.append("timeout", String(wait / 1000));
      let response, body;
      try {
        ({ response, body } = await this.fetch(`/poll?${params}`, {},
                                               wait + (this.opened ? r.options.pingTimeout : r.options.connectTimeout)));
      } catch (error) {
        if (this.ended) return;
        if (generation !== this.generation) continue;  // aborted to change the channel set
        this.abort(CLOSE_ABNORMAL, this.opened ? `poll failed: ${error}` : `the poll did not answer: ${error}`);
        return;
      }
      if (this.ended) return;
      if (!response.ok) {
        if (this.refused(response.status, body)) continue;
        this.finish({ code: null, reason: body.message || `HTTP ${response.status}`, httpStatus: response.status,
                      retryAfter: response.headers.get("Retry-After") });
        return;
      }
      if (!this.opened) { this.opened = true; r._opened(this, {}); }
      if (generation !== this.generation) continue;  // answered for an old channel set: ask again
      for (const msg of body.events || []) {
        if (this.ended) return;
        if (msg.type === "close") { this.finish({ code: msg.code, reason: msg.reason }); return; }
        r._handle(this, msg);
      }
    }
  }
}

const TRANSPORT_CLASSES = { websocket: WebSocketTransport, sse: SseTransport, poll: PollTransport };

// -------------------------------------------------------------------------- the client

/**
 * A connection to relay that survives network blips, restarts and blocked WebSockets.
 *
 * Events (CustomEvent, details in docs/clients.md): status, transport, connecting, connected,
 * disconnected, reconnecting, subscribed, lost, closed.
 */
export class Relay extends EventTarget {
  constructor(url, options = {}) {
    super();
    for (const key of Object.keys(options)) {
      if (!(key in DEFAULTS)) throw new TypeError(`unknown option ${JSON.stringify(key)}; options: ${Object.keys(DEFAULTS).join(", ")}`);
    }
    this.options = { ...DEFAULTS, ...options };
    const o = this.options;
    if (o.encoding !== "json") throw new RangeError(`encoding ${JSON.stringify(o.encoding)} is not available in the browser client; use "json"`);
    for (const key of ["minBackoff", "maxBackoff", "requestTimeout", "connectTimeout", "pingTimeout", "probeInterval", "pollTimeout"]) {
      if (typeof o[key] !== "number" || !(o[key] >= 0) || !Number.isFinite(o[key])) throw new RangeError(`${key} must be a number of milliseconds >= 0, got ${o[key]}`);
    }
    if (!(o.backoffFactor >= 1)) throw new RangeError(`backoffFactor must be >= 1, got ${o.backoffFactor}`);
    if (!(o.maxBackoff >= o.minBackoff)) throw new RangeError("maxBackoff must be >= minBackoff");
    if (!Number.isInteger(o.maxOfflineQueue) || o.maxOfflineQueue < 0) throw new RangeError("maxOfflineQueue must be an integer >= 0");
    if (!Number.isInteger(o.fallbackAfter) || o.fallbackAfter < 1) throw new RangeError("fallbackAfter must be an integer >= 1");
    if (!Number.isInteger(o.tickMs) || (o.tickMs !== 0 && (o.tickMs < MIN_TICK_MS || o.tickMs > MAX_TICK_MS))) {
      throw new RangeError(`tickMs must be 0 (no ticks) or an integer from ${MIN_TICK_MS} to ${MAX_TICK_MS}, got ${o.tickMs}`);
    }
    this._chain = [...o.transports];
    if (!this._chain.length || this._chain.some((t) => !TRANSPORTS.includes(t))) {
      throw new RangeError(`transports must list some of ${TRANSPORTS.join(", ")}, got ${JSON.stringify(o.transports)}`);
    }
    const parsed = new URL(url, globalThis.location ? globalThis.location.href : undefined);
    if (parsed.protocol === "http:" || parsed.protocol === "https:") parsed.protocol = parsed.protocol === "http:" ? "ws:" : "wss:";
    if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") throw new TypeError(`url must be ws:// or wss://, got ${url}`);
    this.url = parsed.href;
    this.httpUrl = (o.httpUrl || `${parsed.protocol === "wss:" ? "https:" : "http:"}//${parsed.host}${parsed.pathname.replace(/\/ws\/?$/, "")}`).replace(/\/$/, "");
    this._token = o.token;
    this._subs = new Map();
    this._queue = [];          // publishes waiting for a transport: {channel, data, resolve, reject}
    this._sending = false;
    this._nextRef = 1;
    this._status = null;
    this._transport = null;
    this._level = 0;
    this._failures = 0;
    this._closed = false;
    this._wakeup = null;
    this.session = null;
    this.node = null;
    this._onOnline = () => this._wake();
    this._onOffline = () => {
      const t = this._transport;
      if (t && !t.ended) t.abort(CLOSE_ABNORMAL, "the browser is offline");
    };
    if (globalThis.addEventListener) {
      globalThis.addEventListener("online", this._onOnline);
      globalThis.addEventListener("offline", this._onOffline);
    }
    this._run().catch((error) => {
      console.error("relay: the client stopped on an unexpected error", error);
      if (!this._closed) this._finish(new ClientClosed(`unexpected error: ${error}`, { cause: error }));
    });
  }

  /** "connecting", "connected", "reconnecting", "offline" or "closed". */
  get status() { return this._status; }

  /** The transport in use while connected: "websocket", "sse" or "poll" (else null). */
  get transport() { return this._transport && this._transport.opened ? this._transport.name : null; }

  /**
   * Subscribe to `channel`; `onMessage({channel, offset, epoch, data, poke})` gets each message once,
   * in order, across reconnections. Options: since ("EPOCH:OFFSET"), onLost(info), onError(error).
   */
  subscribe(channel, onMessage, options = {}) {
    checkChannel(channel);
    if (typeof onMessage !== "function") throw new TypeError("subscribe(channel, onMessage): onMessage must be a function");
    if (this._closed) throw new ClientClosed("the client is closed");
    if (this._subs.has(channel)) throw new RelayError(`already subscribed to ${JSON.stringify(channel)}`);
    const sub = new Subscription(this, channel, onMessage, options);
    this._subs.set(channel, sub);
    const t = this._transport;
    if (t && t.opened && !t.ended) t.subscribe(sub);
    return sub;
  }

  /**
   * Publish `data` (any JSON value) to `channel`; resolves with the ack {channel, offset, epoch}.
   * While disconnected the publish waits in a bounded queue; when it is full this rejects at once
   * with OfflineQueueFull.
   */
  publish(channel, data) {
    try {
      checkChannel(channel);
      checkData(data);
    } catch (error) {
      return Promise.reject(error);
    }
    if (this._closed) return Promise.reject(new ClientClosed("the client is closed"));
    const t = this._transport;
    if (t && t.opened && !t.ended && t.name === "websocket" && !this._queue.length) return t.publish(channel, data);
    const connected = t && t.opened && !t.ended;
    if (this._queue.length >= this.options.maxOfflineQueue) {
      return Promise.reject(new OfflineQueueFull(
        `publish queue full: ${this._queue.length} publishes already wait ${connected ? "to be sent" : "for the connection"} ` +
        `(maxOfflineQueue=${this.options.maxOfflineQueue}); this one was not queued`, { limit: this.options.maxOfflineQueue }));
    }
    return new Promise((resolve, reject) => {
      this._queue.push({ channel, data, resolve, reject });
      if (connected) this._flush();
    });
  }

  /**
   * Replace the token without reconnecting. Over WebSocket the server checks it and this
   * resolves with its expiry (unix seconds); otherwise it resolves with null and the token is
   * used from the next request on (an event stream reopens with it, losing nothing).
   */
  async refresh(token) {
    if (typeof token !== "string" || !token) throw new TypeError("refresh(token): token must be a non-empty string");
    if (this._closed) throw new ClientClosed("the client is closed");
    this._token = token;
    const t = this._transport;
    if (!t || !t.opened || t.ended) return null;
    if (t.name === "websocket") return (await t.request({ type: "refresh", token })).expires;
    t.restart();
    return null;
  }

  /**
   * The members of a channel with presence: [{user, conn, joined, info?}], oldest first.
   * Needs the WebSocket transport (rejects with RelayError while on a fallback or
   * disconnected); rejects with RequestFailed (code bad_request, forbidden, unavailable).
   */
  async presence(channel) {
    return (await this._query({ type: "presence", channel })).members;
  }

  /** The counts of a channel with presence: {connections, users}; see presence(). */
  async presenceStats(channel) {
    const answer = await this._query({ type: "presence_stats", channel });
    return { connections: answer.connections, users: answer.users };
  }

  async _query(message) {
    if (typeof message.channel !== "string") throw new TypeError(`${message.type}(channel): channel must be a string`);
    if (this._closed) throw new ClientClosed("the client is closed");
    const t = this._transport;
    if (!t || !t.opened || t.ended || t.name !== "websocket") {
      throw new RelayError(`${message.type} needs a WebSocket connection`, { channel: message.channel });
    }
    return t.request(message);
  }

  /** Stop for good: close the connection, reject waiting publishes. */
  close() {
    if (this._closed) return;
    this._finish(null);
  }

  // -- internals ------------------------------------------------------------------------

  _emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  _call(fn, ...args) {
    try { fn(...args); } catch (error) { setTimeout(() => { throw error; }); }  // reported, never breaks delivery
  }

  _setStatus(status) {
    if (this._status === status) return;
    this._status = status;
    this._emit("status", status);
  }

  _sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() { clearTimeout(timer); resolve(); }
      this._wakeup = done;
    }).finally(() => { this._wakeup = null; });
  }

  _wake() { if (this._wakeup) this._wakeup(); }

  _online() { return !globalThis.navigator || globalThis.navigator.onLine !== false; }

  async _run() {
    let attempt = 0;
    let everConnected = false;
    while (!this._closed) {
      while (!this._online() && !this._closed) {
        this._setStatus("offline");
        await this._sleep(60000);  // woken by the browser's "online" event
      }
      if (this._closed) return;
      this._setStatus(everConnected ? "reconnecting" : "connecting");
      const name = this._chain[this._level];
      this._emit("connecting", { attempt, url: name === "websocket" ? this.url : this.httpUrl, transport: name });
      const ended = await this._connectOnce(name);
      if (this._closed) return;
      if (ended.opened) everConnected = true;
      this._emit("disconnected", { code: ended.code, reason: ended.reason, httpStatus: ended.httpStatus || null, transport: name });
      if (ended.upgrade) { attempt = 0; continue; }
      let decision;
      if (ended.httpStatus) {
        decision = decideHttp(ended.httpStatus, ended.retryAfter);
      } else if (ended.opened) {
        this._failures = 0;
        decision = decideClose(ended.code, ended.reason);
      } else {
        // Did not open: is the server unreachable, is this transport blocked, or is it us?
        const check = await this._check();
        if (this._closed) return;
        if (check.status === 200 && this._level < this._chain.length - 1) {
          if (++this._failures >= this.options.fallbackAfter) {
            this._level += 1;
            this._failures = 0;
            continue;  // the next transport at once: the server is there, this way to it is not
          }
          decision = { action: "reconnect" };
        } else if (check.status && check.status !== 200) {
          decision = check.retry ? { action: "reconnect" } : decideHttp(check.status, check.retryAfter);
          if (decision.action === "stop") ended.reason = `HTTP ${check.status}: ${check.message}`;
          ended.httpStatus = check.status;
        } else {
          decision = { action: "reconnect" };
        }
      }
      if (ended.stable) attempt = 0;
      if (decision.action === "stop") {
        this._finish(new ClientClosed(`connection ended (${ended.code ?? ended.httpStatus} ${ended.reason}); not reconnecting`,
                                      { code: ended.code, reason: ended.reason, httpStatus: ended.httpStatus || null }));
        return;
      }
      if (decision.action === "refresh" && !(await this._refreshToken(ended))) return;
      attempt += 1;
      const delay = decision.hint != null
        ? decision.hint + Math.random() * this.options.minBackoff
        : backoffDelay(attempt + (decision.longer ? LONGER_BACKOFF_STEPS : 0), this.options);
      this._setStatus("reconnecting");
      this._emit("reconnecting", { attempt, delay, transport: this._chain[this._level] });
      await this._sleep(delay);
    }
  }

  _connectOnce(name) {
    return new Promise((resolve) => {
      const t = new TRANSPORT_CLASSES[name](this);
      t.onEnd = resolve;
      this._transport = t;
      t.start();
    });
  }

  /** A token check through the same door: GET /poll?timeout=0 with the channels (no since). */
  async _check() {
    const params = new URLSearchParams();
    for (const sub of this._subs.values()) params.append("channel", sub.channel);
    params.append("timeout", "0");
    const headers = this._token ? { Authorization: `Bearer ${this._token}` } : {};
    try {
      const controller = new AbortController();
      const timer = setTimeout(() => controller.abort(), this.options.connectTimeout);
      const response = await fetch(`${this.httpUrl}/poll?${params}`, { headers, signal: controller.signal, cache: "no-store" });
      clearTimeout(timer);
      const body = await response.json().catch(() => ({}));
      if (response.status === 403 && body.channel && this._subs.has(body.channel)) {
        const sub = this._subs.get(body.channel);
        this._subs.delete(body.channel);
        sub._fail(new RequestFailed(body.message, { code: body.error, channel: body.channel }));
        return { status: 403, retry: true, message: body.message };
      }
      return { status: response.status, retryAfter: response.headers.get("Retry-After"), message: body.message || "" };
    } catch {
      return { status: 0 };  // unreachable (or refused at the door by a blocked origin)
    }
  }

  async _refreshToken(ended) {
    const what = ended.httpStatus === 401 ? "HTTP 401" : `close ${ended.code}`;
    const callback = this.options.tokenCallback;
    if (!callback) {
      this._finish(new ClientClosed(`the server asked for a new token (${what}) and no tokenCallback was given`,
                                    { code: ended.code, reason: ended.reason, httpStatus: ended.httpStatus || null }));
      return false;
    }
    try {
      const token = await callback();
      if (typeof token !== "string" || !token) throw new TypeError(`tokenCallback must return a non-empty string, got ${token}`);
      this._token = token;
      return true;
    } catch (error) {
      this._finish(new ClientClosed(`tokenCallback failed after ${what}: ${error}`, { cause: error, code: ended.code }));
      return false;
    }
  }

  _opened(t, welcome) {
    if (t !== this._transport || this._closed) return;
    this.session = welcome.session || null;
    this.node = welcome.node || null;
    t.openedAt = Date.now();
    this._setStatus("connected");
    this._emit("transport", t.name);
    this._emit("connected", { session: this.session, node: this.node, transport: t.name });
    if (t.name === "websocket") for (const sub of this._subs.values()) t.subscribe(sub);
    this._flush();
    clearTimeout(this._probeTimer);
    if (this._level > 0) this._probeTimer = setTimeout(() => this._probeUp(t), this.options.probeInterval);
  }

  _ended(t, info) {
    if (t !== this._transport) return;
    clearTimeout(this._probeTimer);
    this._transport = null;
    const stable = t.opened && Date.now() - t.openedAt >= STABLE_CONNECTION_MS;
    if (t.onEnd) t.onEnd({ ...info, opened: t.opened, stable });
  }

  /** While on a fallback, try the transports above it; move up when one opens. */
  async _probeUp(current) {
    for (let level = 0; level < this._level; level += 1) {
      if (current !== this._transport || this._closed) return;
      if (await this._probe(this._chain[level])) {
        if (current !== this._transport || this._closed) return;
        this._level = level;
        this._failures = 0;
        current.shutdown({ code: null, reason: `moving up to ${this._chain[level]}`, upgrade: true });
        return;
      }
    }
    if (current === this._transport && !this._closed) {
      this._probeTimer = setTimeout(() => this._probeUp(current), this.options.probeInterval);
    }
  }

  _probe(name) {
    return new Promise((resolve) => {
      let done = false;
      let close = () => {};
      const finish = (ok) => { if (!done) { done = true; clearTimeout(timer); close(); resolve(ok); } };
      const timer = setTimeout(() => finish(false), this.options.connectTimeout);
      const token = this._token ? `token=${encodeURIComponent(this._token)}` : "";
      try {
        if (name === "websocket") {
          const ws = new WebSocket(this.url + (token ? (this.url.includes("?") ? "&" : "?") + token : ""), [SUBPROTOCOL]);
          close = () => { try { ws.close(1000, "probe"); } catch { /* closing */ } };
          ws.onmessage = (e) => { try { finish(JSON.parse(e.data).type === "welcome"); } catch { finish(false); } };
          ws.onclose = () => finish(false);
        } else if (name === "sse") {
          const es = new EventSource(`${this.httpUrl}/sse?${token}`);
          close = () => es.close();
          es.addEventListener("welcome", () => finish(true));
          es.onerror = () => finish(false);
        } else {
          finish(false);
        }
      } catch {
        finish(false);
      }
    });
  }

  _flush() {
    const t = this._transport;
    if (this._sending || !t || !t.opened || t.ended) return;
    if (t.name === "websocket") {
      while (this._queue.length) {
        const item = this._queue.shift();
        t.publish(item.channel, item.data).then(item.resolve, item.reject);
      }
      return;
    }
    // Over HTTP one publish at a time, so they arrive in the order they were made.
    const item = this._queue.shift();
    if (!item) return;
    this._sending = true;
    t.publish(item.channel, item.data).then(item.resolve, item.reject).finally(() => {
      this._sending = false;
      this._flush();
    });
  }

  _unsubscribe(sub) {
    if (this._subs.get(sub.channel) !== sub) return;
    this._subs.delete(sub.channel);
    const t = this._transport;
    if (t && t.opened && !t.ended) t.unsubscribe(sub);
  }

  /** A delta did not apply to the value held: resubscribe, which brings the full value. */
  _resync(t, sub) {
    if (sub._resyncing || t.name !== "websocket") return;
    sub._resyncing = true;
    sub.resyncs += 1;
    t.unsubscribe(sub);
    t.subscribe(sub);
  }

  _lost(sub, lost) {
    this._emit("lost", lost);
    if (sub._onLost) this._call(sub._onLost, lost);
  }

  /** One message from the server, whatever the transport. */
  _handle(t, msg, request) {
    if (t !== this._transport) return;
    const sub = this._subs.get(msg.channel ?? (request && request.channel));
    switch (msg.type) {
      case "subscribed": {
        if (!sub) return;
        const lost = sub._cursor.onSubscribed(sub._asked, msg.epoch, msg.offset, msg.recovered === true);
        sub._delta = msg.delta === true;
        sub._resyncing = false;
        if (sub._valueAt && sub._valueAt.epoch !== msg.epoch) sub._valueAt = null;
        this._emit("subscribed", { channel: msg.channel, epoch: msg.epoch, offset: msg.offset, recovered: msg.recovered === true });
        if (lost) this._lost(sub, lost);
        sub._resolve(sub);
        return;
      }
      case "message":
      case "poke": {
        if (!sub || !sub._active) return;
        let data = msg.type === "poke" ? null : msg.data;
        if (msg.type === "message" && msg.delta === true) {
          const c = sub._cursor;
          if (c.offset !== null && msg.offset <= c.offset && msg.epoch === undefined) { sub.duplicates += 1; return; }
          const at = sub._valueAt;
          if (msg.epoch !== undefined || !at || at.epoch !== c.epoch || at.offset !== msg.base) {
            this._resync(t, sub);  // not the value held: fetch the full one, never patch the wrong base
            return;
          }
          data = applyMergePatch(sub._value, data);
        }
        const { deliver, lost } = sub._cursor.onMessage(msg.offset, msg.epoch);
        if (lost) this._lost(sub, lost);
        if (!deliver) { sub.duplicates += 1; return; }
        sub.delivered += 1;
        if (sub._delta && msg.type === "message") {
          sub._value = data;
          sub._valueAt = { epoch: sub._cursor.epoch, offset: msg.offset };
          data = copyValue(data);
        }
        // ts: the server's publish stamp (unix µs on the wire), here in ms like Date.now().
        const received = nowMs();
        const ts = Number.isInteger(msg.ts) ? msg.ts / 1000 : null;
        const latency = ts === null ? null : received - ts;
        if (latency !== null) sub._recordLatency(latency);
        this._call(sub._onMessage, { channel: msg.channel, offset: msg.offset, epoch: sub._cursor.epoch,
                                     data, poke: msg.type === "poke", ts, received, latency });
        return;
      }
      case "gap": {
        if (!sub) return;
        const lost = sub._cursor.onGap(msg.from, msg.to);
        if (lost) this._lost(sub, lost);
        return;
      }
      case "error": {
        if (request && request.type === "subscribe" && sub) {
          this._subs.delete(sub.channel);
          sub._fail(new RequestFailed(msg.message, { code: msg.code, channel: sub.channel }));
        } else if (!request) {
          console.warn(`relay: error from the server: ${msg.code}: ${msg.message}`);
        }
        return;
      }
      case "join":
      case "leave":
      case "presence_diff": {  // presence: "leave" events first, then "join" events
        if (!sub) return;
        const diff = msg.type === "presence_diff";
        const leaves = diff ? msg.leaves : msg.type === "leave" ? [msg.member] : [];
        const joins = diff ? msg.joins : msg.type === "join" ? [msg.member] : [];
        for (const member of leaves || []) this._emit("leave", { channel: msg.channel, member });
        for (const member of joins || []) this._emit("join", { channel: msg.channel, member });
        return;
      }
      case "unsubscribed": {
        if (!request && sub) {  // a refreshed token no longer covers the channel
          this._subs.delete(sub.channel);
          sub._fail(new RelayError(`the server ended the subscription to ${JSON.stringify(sub.channel)}`, { channel: sub.channel }));
        }
        return;
      }
      default:
        return;  // welcome again, or a type a newer server may add
    }
  }

  _finish(error) {
    this._closed = true;
    clearTimeout(this._probeTimer);
    if (globalThis.removeEventListener) {
      globalThis.removeEventListener("online", this._onOnline);
      globalThis.removeEventListener("offline", this._onOffline);
    }
    const t = this._transport;
    this._transport = null;
    if (t) { t.onEnd = null; t.close(); }
    const closed = error || new ClientClosed("the client is closed");
    for (const item of this._queue.splice(0)) item.reject(closed);
    for (const sub of this._subs.values()) {
      if (error) sub._fail(closed);
      else { sub._active = false; sub._reject(closed); }
    }
    this._subs.clear();
    this._wake();
    this._setStatus("closed");
    this._emit("closed", { error });
  }
}
