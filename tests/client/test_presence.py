"""The Python client's presence API against a real in-process server: ``presence``,
``presence_stats``, errors, and join/leave surfaced as events."""

from __future__ import annotations

import pytest
import trio

from relay.client import Join, Leave, Member, PresenceStats, RequestFailed, connect

from .conftest import running_server

CHANNELS = (
    {"pattern": "lobby.*", "presence": True, "join_leave": True},
    {"pattern": "big.*", "presence": True, "join_leave": True, "join_leave_interval": 0.05},
)


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_presence_stats_and_join_leave_events(encoding: str) -> None:
    with trio.fail_after(10):
        async with running_server(channels=CHANNELS) as server, \
                connect(server.url, encoding=encoding) as a:
            events = a.events()
            await a.wait_connected()
            await a.subscribe("lobby.1")
            async with connect(server.url) as b:
                await b.wait_connected()
                await b.subscribe("lobby.1")
                members = await b.presence("lobby.1")
                assert [m.conn for m in members] == [a.session, b.session], (members, a.session, b.session)
                assert all(isinstance(m, Member) and m.user == "" and m.info is None for m in members)
                assert await a.presence_stats("lobby.1") == PresenceStats("lobby.1", 2, 1)
                with pytest.raises(RequestFailed) as refused:
                    await b.presence("chat.1")
                assert refused.value.code == "bad_request" and "presence is not enabled" in refused.value.message
            seen = []
            async for event in events:
                if isinstance(event, (Join, Leave)):
                    seen.append((type(event).__name__, event.channel, event.member.conn))
                    if len(seen) == 3:
                        break
            assert seen == [("Join", "lobby.1", a.session), ("Join", "lobby.1", b.session),
                            ("Leave", "lobby.1", b.session)]
            # A batched channel's presence_diff arrives as the same events.
            await a.subscribe("big.1")
            async for event in events:
                if isinstance(event, Join):
                    assert event == Join("big.1", (await a.presence("big.1"))[0])
                    break
