"""The status page served at ``/``: one HTML document with its style and script inline.

It polls ``/stats`` every second and shows counts, per-second rates computed from two
successive snapshots, and the error, refusal and close counters. It loads nothing else
(no fonts, no CDN), so it works offline and behind strict networks. Kept as a Python string
so it ships in every wheel.
"""

from __future__ import annotations

STATUS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>relay status</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
  h1 { font-size: 1.3em; margin: 0 0 .2em; }
  #meta { color: #666; margin-bottom: 1em; }
  .grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(11em, 1fr)); gap: .6em; }
  .card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .6em .8em; }
  .card .label { color: #666; font-size: .85em; }
  .card .value { font-size: 1.5em; font-variant-numeric: tabular-nums; }
  table { border-collapse: collapse; margin-top: .4em; }
  td { padding: .1em .8em .1em 0; font-variant-numeric: tabular-nums; }
  h2 { font-size: 1em; margin: 1.2em 0 .2em; }
  .bad { color: #b00; }
</style>
</head>
<body>
<h1>relay <span id="node"></span></h1>
<div id="meta">connecting…</div>
<div class="grid">
  <div class="card"><div class="label">connections</div><div class="value" id="connections">–</div></div>
  <div class="card"><div class="label">client addresses</div><div class="value" id="addresses">–</div></div>
  <div class="card"><div class="label">channels</div><div class="value" id="channels">–</div></div>
  <div class="card"><div class="label">subscriptions</div><div class="value" id="subscriptions">–</div></div>
  <div class="card"><div class="label">messages in / s</div><div class="value" id="in_rate">–</div></div>
  <div class="card"><div class="label">published / s</div><div class="value" id="pub_rate">–</div></div>
  <div class="card"><div class="label">delivered / s</div><div class="value" id="del_rate">–</div></div>
  <div class="card"><div class="label">bytes in / s</div><div class="value" id="bin_rate">–</div></div>
  <div class="card"><div class="label">bytes out / s</div><div class="value" id="bout_rate">–</div></div>
  <div class="card"><div class="label">send queues (max)</div><div class="value" id="queues">–</div></div>
</div>
<h2>publish-to-write latency (ms), latest publications per channel pattern</h2><table id="latency"></table>
<h2>errors sent, by code</h2><table id="errors"></table>
<h2>handshakes refused, by reason</h2><table id="refused"></table>
<h2>connections closed, by code</h2><table id="closed"></table>
<script>
"use strict";
let previous = null;
const $ = (id) => document.getElementById(id);
const fmt = (n) => n >= 1e6 ? (n / 1e6).toFixed(1) + "M" : n >= 1e4 ? (n / 1e3).toFixed(1) + "k" : String(Math.round(n));
function rate(now, before, pick) {
  if (!before) return "–";
  const dt = now.time - before.time;
  return dt > 0 ? fmt(Math.max(0, pick(now) - pick(before)) / dt) : "–";
}
function table(id, counts) {
  const el = $(id);
  el.replaceChildren();
  const keys = Object.keys(counts);
  if (!keys.length) { const row = el.insertRow(); row.insertCell().textContent = "none"; return; }
  for (const key of keys) {
    const row = el.insertRow();
    row.insertCell().textContent = key;
    row.insertCell().textContent = fmt(counts[key]);
  }
}
function latency(rows) {
  const el = $("latency");
  el.replaceChildren();
  const head = el.insertRow();
  for (const h of ["pattern", "mode", "samples", "p50", "p90", "p99", "p99.9", "max"]) head.insertCell().textContent = h;
  if (!rows.length) { el.insertRow().insertCell().textContent = "no publication delivered yet"; return; }
  for (const r of rows) {
    const row = el.insertRow();
    row.className = "latency";
    for (const v of [r.pattern, r.mode, fmt(r.samples), r.p50, r.p90, r.p99, r.p999, r.max]) row.insertCell().textContent = String(v);
  }
}
function show(s) {
  $("node").textContent = s.node;
  $("meta").textContent = "version " + s.version + ", up " + Math.round(s.uptime_seconds) + " s" + (s.draining ? ", DRAINING" : "");
  $("meta").className = s.draining ? "bad" : "";
  $("connections").textContent = fmt(s.connections.active);
  $("addresses").textContent = fmt(s.connections.client_addresses);
  $("channels").textContent = fmt(s.channels);
  $("subscriptions").textContent = fmt(s.subscriptions);
  $("in_rate").textContent = rate(s, previous, (x) => x.messages.received_total);
  $("pub_rate").textContent = rate(s, previous, (x) => x.messages.published_total);
  $("del_rate").textContent = rate(s, previous, (x) => x.messages.delivered_total);
  $("bin_rate").textContent = rate(s, previous, (x) => x.bytes.received_total);
  $("bout_rate").textContent = rate(s, previous, (x) => x.bytes.sent_total);
  $("queues").textContent = fmt(s.send_queue.bytes) + " (" + fmt(s.send_queue.max_bytes) + ")";
  latency(s.publish_to_write_ms);
  table("errors", s.errors_total);
  table("refused", s.handshakes_refused_total);
  table("closed", s.connections.closed_total);
  previous = s;
}
async function poll() {
  try {
    const response = await fetch("stats", {cache: "no-store"});
    show(await response.json());
  } catch (err) {
    $("meta").textContent = "cannot reach the server: " + err;
    $("meta").className = "bad";
  }
  setTimeout(poll, 1000);
}
poll();
</script>
</body>
</html>
"""

__all__ = ["STATUS_PAGE"]
