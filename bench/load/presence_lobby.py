"""How many join/leave messages a lobby costs: N clients join one presence channel, one
after another, then all leave; prints the messages handed to subscribers under three
settings (immediate, batched every 0.5 s, capped at 100 members).

    PYTHONPATH=. python bench/load/presence_lobby.py 400

One in-process server on loopback, the ``websockets`` client; results in docs/protocol.md
(Presence, "What it costs").
"""
import sys, time, trio
from relay.config import Config, ChannelOptions, LimitsConfig
from relay.server.app import RelayServer
from websockets.trio.client import connect

N = int(sys.argv[1])

async def member(url, done, task_status=trio.TASK_STATUS_IGNORED):
    async with connect(url, max_queue=None) as ws:
        await ws.recv()
        await ws.send('{"type":"subscribe","channel":"lobby.1"}')
        while '"subscribed"' not in await ws.recv():
            pass
        task_status.started()
        async with trio.open_nursery() as n:
            async def drain():
                async for _ in ws:
                    pass
            n.start_soon(drain)
            await done.wait()
            n.cancel_scope.cancel()

async def run(opts):
    cfg = Config(host="127.0.0.1", port=0, node_id="b",
                 limits=LimitsConfig(messages_per_second=0, bytes_per_second=0, max_connections_per_ip=0),
                 channels=(opts,))
    async with trio.open_nursery() as nursery:
        server = await nursery.start(RelayServer(cfg).run)
        t0 = time.perf_counter()
        done = trio.Event()
        async with trio.open_nursery() as members:
            for i in range(N):
                await members.start(member, server.url, done)
            await trio.sleep(1.0)
            joined = server.hub.presence.statistics()
            done.set()
        await trio.sleep(1.0)
        st = server.hub.presence.statistics()
        print(f"interval={opts.join_leave_interval} cap={opts.join_leave_max_members}: N={N} "
              f"after joins announced={joined.announced} skipped={joined.skipped}; after leaves "
              f"announced={st.announced} skipped={st.skipped}; {time.perf_counter()-t0:.1f}s", flush=True)
        server.stop()

async def main():
    await run(ChannelOptions(pattern="lobby.*", presence=True, join_leave=True, join_leave_max_members=0))
    await run(ChannelOptions(pattern="lobby.*", presence=True, join_leave=True, join_leave_max_members=0, join_leave_interval=0.5))
    await run(ChannelOptions(pattern="lobby.*", presence=True, join_leave=True, join_leave_max_members=100))
trio.run(main)
