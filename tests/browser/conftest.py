"""Headless Chromium (Debian's, driven by Playwright) against real relay servers over loopback.

Playwright's sync API runs in one thread of its own (:class:`Chromium`); the trio tests
hand it work with ``await chromium.run(fn)``, so the servers, proxies and publishers
of a test keep running in trio meanwhile. Each test page comes from a small page server
of its own on another loopback port (a cross-origin page, as a real application's would
be; Chromium lets a loopback page, and only that, reach relay on loopback) and imports
the client from the server under test: ``http://127.0.0.1:PORT/client.js``.

Without Chromium or Playwright the tests skip, except under ``RELAY_REQUIRE_BROWSER=1``
(CI), where they fail.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from relay.config import AuthConfig, ChannelOptions, Config, LimitsConfig
from relay.server.app import RelayServer

REPO = Path(__file__).resolve().parents[2]
#: The test pages' origins (http://127.0.0.1:PAGE_PORT), as allowed_origins sees them.
APP_ORIGIN = "http://127.0.0.1:*"
REQUIRE = os.environ.get("RELAY_REQUIRE_BROWSER", "") not in ("", "0")
#: Longest single wait inside the browser (ms); every test's fail_after is longer.
WAIT_MS = 15000


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class _Job:
    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class Chromium:
    """One headless Chromium, owned by a thread that runs every Playwright call."""

    def __init__(self, executable: str) -> None:
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(executable,), daemon=True)
        self._thread.start()
        self._started.wait(60)
        if self._startup_error is not None:
            raise self._startup_error

    def _main(self, executable: str) -> None:
        from playwright.sync_api import sync_playwright

        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=executable, headless=True,
                                            args=["--no-sandbox", "--disable-gpu"])
                self._started.set()
                while (job := self._jobs.get()) is not None:
                    try:
                        job.result = job.fn(browser)
                    except BaseException as exc:  # handed to the waiting test, which re-raises it
                        job.error = exc
                    job.done.set()
                browser.close()
        except BaseException as exc:  # a launch failure: reported by the constructor
            self._startup_error = exc
            self._started.set()

    def call(self, fn: Callable[[Any], Any]) -> Any:
        job = _Job(fn)
        self._jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    async def run(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(browser)`` in the browser's thread and return its result."""
        return await trio.to_thread.run_sync(self.call, fn)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(30)


@pytest.fixture(scope="session")
def chromium() -> Iterator[Chromium]:
    executable = chromium_path()
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        executable = None if executable is None else ""
    if not executable:
        reason = ("needs Playwright (pip install -e '.[test]')" if executable == ""
                  else "needs a headless Chromium (apt-get install chromium)")
        if REQUIRE:
            pytest.fail(f"RELAY_REQUIRE_BROWSER=1 but the browser tests cannot run: {reason}")
        pytest.skip(reason)
    browser = Chromium(executable)
    try:
        yield browser
    finally:
        browser.stop()


# --------------------------------------------------------------------------- the page


HARNESS = """<!doctype html>
<html><head><meta charset="utf-8"><title>relay test page</title></head>
<body>
<p>status: <span id="status">none</span> via <span id="transport">-</span></p>
<script type="module">
import * as relayModule from "%(client)s";
window.relayModule = relayModule;
window.events = [];
window.received = {};
window.lost = [];
window.acks = [];
window.failures = [];
window.start = (url, options) => {
  const relay = new relayModule.Relay(url, options);
  window.relay = relay;
  for (const type of ["status", "transport", "connecting", "connected", "disconnected", "reconnecting",
                      "subscribed", "lost", "closed", "join", "leave"]) {
    relay.addEventListener(type, (e) => {
      window.events.push([type, e.detail, Date.now() %% 100000]);
      if (type === "status") document.getElementById("status").textContent = e.detail;
      if (type === "transport") document.getElementById("transport").textContent = e.detail;
    });
  }
  document.getElementById("status").textContent = relay.status;
};
window.sub = (channel, options = {}) => {
  window.received[channel] = [];
  return relay.subscribe(channel, (m) => window.received[channel].push([m.offset, m.data]),
                         { ...options, onLost: (info) => window.lost.push(info) });
};
window.pub = (channel, data) => relay.publish(channel, data).then(
  (ack) => { window.acks.push(ack); return ack; },
  (error) => { window.failures.push([error.name, error.message]); throw error; });
window.ready = true;
</script>
</body></html>
"""


class Page:
    """A browser page at http://app.test/ with the test harness above loaded."""

    def __init__(self, chromium: Chromium, context: Any, page: Any) -> None:
        self.chromium = chromium
        self.context = context
        self.page = page
        self.console: list[str] = []

    async def eval(self, script: str, arg: Any = None) -> Any:
        return await self.chromium.run(lambda _b: self.page.evaluate(script, arg))

    async def wait(self, condition: str, arg: Any = None, timeout_ms: int = WAIT_MS) -> None:
        """Wait until the JavaScript expression ``condition`` is truthy in the page."""
        def wait(_browser: Any) -> None:
            try:
                self.page.wait_for_function(condition, arg=arg, timeout=timeout_ms)
            except Exception as exc:
                state = self.page.evaluate(
                    "JSON.stringify({status: window.relay && relay.status, events: window.events.slice(-12),"
                    " received: window.received, failures: window.failures})")
                raise AssertionError(f"waited {timeout_ms} ms for {condition}; page: {state}; "
                                     f"console: {self.console[-10:]}") from exc
        await self.chromium.run(wait)

    async def text(self, selector: str) -> str:
        return await self.chromium.run(lambda _b: self.page.text_content(selector))  # type: ignore[no-any-return]

    async def set_offline(self, offline: bool) -> None:
        await self.chromium.run(lambda _b: self.context.set_offline(offline))

    async def received(self, channel: str) -> list[tuple[int, Any]]:
        return [tuple(x) for x in await self.eval(f"window.received[{json.dumps(channel)}]")]


async def _serve_page(body: bytes, stream: trio.SocketStream) -> None:
    async with stream:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                head += chunk
            found = head.startswith(b"GET / ")
            status, content = (b"200 OK", body) if found else (b"404 Not Found", b"not found\n")
            await stream.send_all(b"HTTP/1.1 %s\r\nContent-Type: text/html; charset=utf-8\r\n"
                                  b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (status, len(content), content))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the browser went away


@asynccontextmanager
async def open_page(chromium: Chromium, client_js: str, html: str | None = None) -> AsyncIterator[Page]:
    """A new browser context with one page (the harness, or ``html``) from a loopback page server."""
    body = (html if html is not None else HARNESS % {"client": client_js}).encode()
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/"
        nursery.start_soon(partial(trio.serve_listeners, partial(_serve_page, body), listeners,
                                   handler_nursery=nursery))

        def create(browser: Any) -> Page:
            context = browser.new_context()
            page = context.new_page()
            wrapper = Page(chromium, context, page)
            page.on("console", lambda msg: wrapper.console.append(f"{msg.type}: {msg.text}"))
            page.goto(url)
            if html is None:
                page.wait_for_function("window.ready === true", timeout=WAIT_MS)
            return wrapper

        page = await chromium.run(create)
        try:
            yield page
        finally:
            await chromium.run(lambda _b: page.context.close())
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- servers


def make_config(**overrides: Any) -> Config:
    channels = overrides.pop("channels", ())
    overrides.setdefault("port", 0)
    overrides.setdefault("node_id", "test")
    overrides.setdefault("auth", AuthConfig(allowed_origins=(APP_ORIGIN,)))
    overrides.setdefault("limits", LimitsConfig(messages_per_second=0, bytes_per_second=0))
    return Config(host="127.0.0.1", channels=tuple(
        c if isinstance(c, ChannelOptions) else ChannelOptions(**c) for c in channels), **overrides)


@asynccontextmanager
async def running_server(**overrides: Any) -> AsyncIterator[RelayServer]:
    async with trio.open_nursery() as nursery:
        server: RelayServer = await nursery.start(RelayServer(make_config(**overrides)).run)
        try:
            yield server
        finally:
            server.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def relay_process(port: int, config: str) -> AsyncIterator[trio.Process]:
    """``python -m relay serve --port PORT --config FILE``; yields once it listens; killed on exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") or k == "RELAY_PURE_PYTHON"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay", "serve", "--port", str(port), "--config", config],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = b""
    try:
        assert proc.stdout is not None
        while b"relay listening on" not in output:
            chunk = await proc.stdout.receive_some(65536)
            assert chunk, f"relay exited before listening:\n{output.decode(errors='replace')}"
            output += chunk
        async with trio.open_nursery() as nursery:
            async def drain_output() -> None:
                assert proc.stdout is not None
                async for _ in proc.stdout:
                    pass
            nursery.start_soon(drain_output)
            yield proc
            nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()


# --------------------------------------------------------------------------- proxy


class GateProxy:
    """A loopback HTTP proxy in front of relay that can refuse WebSocket upgrades and /sse,
    the way a corporate proxy might; everything else passes, one request per connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.block_websocket = False
        self.block_sse = False
        self.refused: list[str] = []
        self.passed: list[str] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def run(self, *, task_status: trio.TaskStatus[GateProxy] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            try:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = await client.receive_some(65536)
                    if not chunk:
                        return
                    head += chunk
                head, _, rest = head.partition(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                path = request_line.split(" ")[1] if " " in request_line else ""
                upgrade = any(line.lower().startswith("upgrade:") and "websocket" in line.lower() for line in lines)
                if (upgrade and self.block_websocket) or (path.startswith("/sse") and self.block_sse):
                    self.refused.append(path)
                    await client.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n"
                                          b"Content-Length: 19\r\nConnection: close\r\n\r\nblocked by a proxy\n")
                    return
                self.passed.append(path)
                if not upgrade:  # one request per connection: the next one is inspected too
                    lines = [line for line in lines if not line.lower().startswith("connection:")]
                    lines.append("Connection: close")
                forwarded = "\r\n".join([request_line, *lines]).encode("latin-1") + b"\r\n\r\n" + rest
                async with await trio.open_tcp_stream("127.0.0.1", self.target_port) as server:
                    await server.send_all(forwarded)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                        nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # either side went away: the other sees it too

    @staticmethod
    async def _pump(src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # one side went away
        finally:
            scope.cancel()


@asynccontextmanager
async def gate_proxy(target_port: int) -> AsyncIterator[GateProxy]:
    async with trio.open_nursery() as nursery:
        proxy: GateProxy = await nursery.start(GateProxy(target_port).run)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


async def http_publish(port: int, channel: str, data: Any, api_key: str = "") -> dict[str, Any]:
    """Publish as a backend would (POST /api/publish), over a raw socket."""
    body = json.dumps({"channel": channel, "data": data}).encode()
    key = f"Authorization: apikey {api_key}\r\n".encode() if api_key else b""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"POST /api/publish HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n" + key +
                              b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    assert status == 200, answer
    return json.loads(answer.partition(b"\r\n\r\n")[2])  # type: ignore[no-any-return]
