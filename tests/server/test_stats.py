"""GET /stats (a JSON snapshot) and the status page at /."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import pytest
import trio

from .conftest import http_get, http_post_json, http_request, open_client, running_server


async def test_stats_counts_what_happened() -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            async with open_client(server) as a, open_client(server) as b:
                await a.subscribe("news")
                await b.subscribe("other")
                await b.publish("news", {"n": 1})
                assert (await a.recv())["type"] == "message"
                await a.request({"type": "subscribe", "channel": "", "ref": 1})  # bad_request
                status, answer = await http_post_json(server, "/api/publish", {"channel": "news", "data": 2})
                assert status == 200
                status, s = await http_get(server, "/stats")
    assert status == 200
    assert s["node"] == "test" and s["version"] and s["uptime_seconds"] >= 0 and s["draining"] is False
    assert s["connections"]["active"] == 2 and s["connections"]["client_addresses"] == 1
    assert s["connections"]["accepted_total"] == 2
    assert s["channels"] == 2 and s["subscriptions"] == 2
    assert s["messages"]["received_total"] >= 4 and s["messages"]["published_total"] == 2
    assert s["messages"]["delivered_total"] == 2  # one subscriber, two publications
    assert s["bytes"]["received_total"] > 0 and s["bytes"]["sent_total"] > 0
    assert s["errors_total"] == {"bad_request": 1}
    assert s["send_queue"]["bytes"] >= 0 and s["send_queue"]["max_bytes"] >= 0


async def test_status_page_is_served_at_the_root() -> None:
    with trio.fail_after(10):
        async with running_server() as server:
            status, body, headers = await http_request(server, "GET", "/")
            assert status == 200 and headers["content-type"].startswith("text/html")
            page = body.decode()
            assert "<title>relay status</title>" in page and 'fetch("stats"' in page
            assert headers["x-content-type-options"] == "nosniff"
            assert (await http_request(server, "HEAD", "/"))[0] == 200
            assert (await http_request(server, "POST", "/", b""))[0] == 405
            status, body, _ = await http_request(server, "POST", "/stats", b"")
            assert status == 405 and json.loads(body)["error"] == "method_not_allowed"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


# Skips only on a developer machine without Chromium; CI (.ci/run) installs it and sets
# RELAY_REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping.
@pytest.mark.skipif(_chromium() is None and not os.environ.get("RELAY_REQUIRE_BROWSER"),
                    reason="needs a headless Chromium (apt-get install chromium)")
async def test_status_page_updates_live_in_headless_chromium() -> None:
    """The page polls /stats and shows counts and rates; read the DOM Chromium rendered."""
    chromium = _chromium()
    assert chromium is not None
    # max_queue=None: the subscriber does not read, and a bounded client queue would stop
    # it reading the close frame at the end.
    with trio.fail_after(30):
        async with running_server() as server, open_client(server, max_queue=None) as a, \
                open_client(server) as b:
            await a.subscribe("news")

            async def publish_steadily() -> None:
                i = 0
                while True:
                    await b.send({"type": "publish", "channel": "news", "data": i})
                    i += 1
                    await trio.sleep(0.01)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(publish_steadily)
                result = await trio.run_process(
                    [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--user-data-dir=" + tempfile.mkdtemp(prefix="relay-chromium-"),
                     "--virtual-time-budget=3000", "--dump-dom", f"{server.http_url}/"],
                    capture_stdout=True, capture_stderr=True)
                nursery.cancel_scope.cancel()
    dom = result.stdout.decode()
    values = dict(re.findall(r'<div class="value" id="(\w+)">([^<]*)</div>', dom))
    assert values["connections"] == "2" and values["channels"] == "1", values
    assert values["subscriptions"] == "1"
    # a rate needs two snapshots: the page polled /stats again and updated in place (under
    # Chromium's virtual time the polls come faster than a second, so the value itself varies)
    rates = ("in_rate", "pub_rate", "del_rate", "bin_rate", "bout_rate")
    assert all(re.fullmatch(r"[0-9.]+[kM]?", values[k]) for k in rates), values
    assert 'id="node">test<' in dom
    # the latency table: one row for the default channel pattern, percentiles in ms
    row = re.search(r'<tr class="latency">(.*?)</tr>', dom)
    assert row is not None, dom[-2000:]
    cells = re.findall(r"<td>([^<]*)</td>", row.group(1))
    assert cells[:2] == ["*", "stream"] and all(float(c) >= 0 for c in cells[3:]), cells


async def test_publish_to_write_latency_per_channel_pattern_in_stats_and_metrics() -> None:
    """Each publication with subscribers is timed from ingress to the write of its fan-out:
    percentiles per channel pattern in /stats, a histogram in /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    channels = [{"pattern": "prices.*", "mode": "state"}, {"pattern": "*"}]
    with trio.fail_after(10):
        async with running_server(channels=channels) as server:
            async with open_client(server) as sub, open_client(server) as pub:
                await sub.subscribe("prices.eur")
                await sub.subscribe("chat")
                for i in range(5):
                    await pub.publish("prices.eur", i)
                    assert (await sub.recv())["data"] == i
                for i in range(3):
                    await pub.publish("chat", i)
                    assert (await sub.recv())["data"] == i
                await pub.publish("nobody.listens", 1)  # no subscriber: nothing written, not timed
                status, s = await http_get(server, "/stats")
                _, metrics, _ = await http_request(server, "GET", "/metrics")
    assert status == 200
    rows = {(r["pattern"], r["mode"]): r for r in s["publish_to_write_ms"]}
    assert set(rows) == {("prices.*", "state"), ("*", "stream")}, rows
    assert rows[("prices.*", "state")]["samples"] == 5 and rows[("*", "stream")]["samples"] == 3
    for row in rows.values():
        assert 0 <= row["p50"] <= row["p90"] <= row["p99"] <= row["p999"] <= row["max"] < 1000, row
    counts = {}
    for family in text_string_to_metric_families(metrics.decode()):
        for sample in family.samples:
            if sample.name == "relay_publish_to_write_seconds_count":
                counts[(sample.labels["pattern"], sample.labels["mode"])] = sample.value
    assert counts == {("prices.*", "state"): 5, ("*", "stream"): 3}, counts


async def test_per_connection_lag_in_stats_and_metrics() -> None:
    """A subscriber that stops reading falls behind: /stats lists it first among the slowest
    with bytes and frames waiting and the age of its oldest waiting message, which grows;
    /metrics counts it in the lag distributions. A subscriber that reads is not behind."""
    from prometheus_client.parser import text_string_to_metric_families

    big = "x" * 200_000
    with trio.fail_after(20):
        async with running_server(send_queue_size=64 << 20, max_message_size=1 << 20) as server:
            async with open_client(server, max_size=None, max_queue=1) as stuck, \
                    open_client(server, max_size=None) as reader, open_client(server) as pub:
                await stuck.subscribe("feed")
                await reader.subscribe("feed")
                stuck_id = list(server.connections)[0]  # (opened first)
                for i in range(60):  # 12 MB: more than loopback's socket buffers hold
                    await pub.publish("feed", big, ref=i)
                    assert (await reader.recv())["offset"] == i + 1
                status, first = await http_get(server, "/stats")
                await trio.sleep(0.3)
                _, second = await http_get(server, "/stats")
                _, metrics, _ = await http_request(server, "GET", "/metrics")
                # once it reads again it gets everything, and is no longer behind
                assert [(await stuck.recv())["offset"] for _ in range(60)] == list(range(1, 61))
                _, caught_up = await http_get(server, "/stats")
    assert status == 200
    assert caught_up["lag"] == {"connections_waiting": 0, "slowest": []}, caught_up["lag"]
    lag = second["lag"]
    assert lag["connections_waiting"] >= 1 and lag["age_ms"]["max"] >= 300, lag
    slowest = lag["slowest"][0]
    assert slowest["queued_bytes"] > 1_000_000 and slowest["queued_frames"] >= 1, slowest
    earlier = next(row for row in first["lag"]["slowest"] if row["id"] == slowest["id"])
    assert slowest["age_ms"] >= earlier["age_ms"] + 250, (earlier, slowest)
    assert slowest["id"] == stuck_id and slowest["user"] == "" and slowest["peer"].startswith("127.0.0.1:")
    found = {}
    for family in text_string_to_metric_families(metrics.decode()):
        for sample in family.samples:
            if sample.name.startswith("relay_connection_lag") or sample.name.startswith("relay_connection_send_queue"):
                found[(sample.name, sample.labels.get("le"))] = sample.value
    assert found[("relay_connection_lag_seconds_bucket", "+Inf")] == 3  # every connection
    assert found[("relay_connection_lag_seconds_bucket", "0.1")] <= 2   # the stuck one waited longer
    assert found[("relay_connection_lag_max_seconds", None)] >= 0.3
    assert found[("relay_connection_send_queue_bytes_bucket", "1048576.0")] <= 2
