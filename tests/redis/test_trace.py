"""A publication's trace id travels with it through Redis and shows in the debug log of
every node that delivered it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import trio

from .conftest import client, http, redis_server, relay_nodes


def delivered(output: str, channel: str) -> dict[int, str]:
    """offset -> trace id of the ``deliver`` log lines for ``channel`` in a node's JSON log."""
    found = {}
    for line in output.splitlines():
        if '"deliver"' not in line:
            continue
        record = json.loads(line)
        if record.get("event") == "deliver" and record.get("channel") == channel:
            found[record["offset"]] = record["trace"]
    return found


async def test_the_trace_id_of_a_publication_is_logged_by_every_node_that_delivered_it(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with redis_server(tmp_path) as redis, relay_nodes(
                tmp_path, 3, "--redis-url", redis.url, "--log-level", "debug", "--log-format", "json") as (a, b, c):
            async with client(a) as sa, client(b) as sb:
                await sa.subscribe("traced", ref=1)
                await sb.subscribe("traced", ref=1)
                for n in range(3):
                    status, body = await http(c, "POST", "/api/publish", {"channel": "traced", "data": n})
                    assert status == 200, body
                for sub in (sa, sb):
                    for n in range(3):
                        assert (await sub.recv())["data"] == n
                # the log lines are written right after the fan-out; give the pipes a moment
                for _ in range(50):
                    if len(delivered(a.output, "traced")) == 3 and len(delivered(b.output, "traced")) == 3:
                        break
                    await trio.sleep(0.05)
    on_a, on_b = delivered(a.output, "traced"), delivered(b.output, "traced")
    assert set(on_a) == {1, 2, 3} and on_a == on_b, (on_a, on_b)
    assert all(re.fullmatch(r"[0-9a-f]{16}", trace) for trace in on_a.values()), on_a
    assert len(set(on_a.values())) == 3  # one id per publication
    assert delivered(c.output, "traced") == {}  # c had no subscriber: it delivered nothing
