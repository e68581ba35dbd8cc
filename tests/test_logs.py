"""Tests for relay.logs (text and JSON lines) and the per-connection log lines of a live server."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time

import jwt
import pytest
import trio

from relay import logs
from relay.config import AuthConfig

from server.conftest import http_request, open_client, running_server

SECRET = "an-hs256-secret-of-at-least-32-bytes!"


def _record(msg: str = "hello %s", args: tuple[object, ...] = ("world",), **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("relay.test", logging.INFO, __file__, 1, msg, args, None)
    if fields:
        record.fields = fields
    return record


def test_json_lines_carry_fields_and_stay_on_one_line() -> None:
    line = logs.JsonFormatter().format(_record(conn="ab12", user="alice", code=4001, duration_s=1.5))
    obj = json.loads(line)
    assert obj["level"] == "info" and obj["logger"] == "relay.test" and obj["msg"] == "hello world"
    assert obj["ts"].endswith("Z") and "T" in obj["ts"]
    assert (obj["conn"], obj["user"], obj["code"], obj["duration_s"]) == ("ab12", "alice", 4001, 1.5)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = _record()
        record.exc_info = sys.exc_info()
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exc"]


def test_text_lines_append_fields() -> None:
    line = logs.TextFormatter().format(_record(conn="ab12", reason="token expired", user=""))
    assert line.endswith('relay.test: hello world conn=ab12 reason="token expired" user=""')
    assert logs.TextFormatter().format(_record()).endswith("hello world")


def test_setup_replaces_handlers_and_checks_the_format() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        out = io.StringIO()
        logs.setup("warning", "json", out)
        logs.setup("info", "json", out)
        assert len(root.handlers) == 1
        logging.getLogger("relay.x").info("hi", extra=logs.fields(a=1))
        assert json.loads(out.getvalue())["a"] == 1
        with pytest.raises(ValueError, match="log_format"):
            logs.setup("info", "xml")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)


async def test_one_line_per_connection_open_and_close_and_never_a_token(caplog: pytest.LogCaptureFixture) -> None:
    tok = jwt.encode({"sub": "alice", "exp": time.time() + 60}, SECRET, algorithm="HS256")
    forged = jwt.encode({"sub": "eve", "exp": time.time() + 60}, "x" * 32, algorithm="HS256")
    with trio.fail_after(10), caplog.at_level(logging.DEBUG, logger="relay"):
        async with running_server(auth=AuthConfig(jwt_secret=SECRET, api_keys=("backend-key-0123456789",))) as server:
            async with open_client(server, uri_path=f"/ws?token={tok}") as c:
                session = c.welcome["session"]
                await c.ws.aclose(1000)
            with trio.fail_after(3):
                while server.connections:
                    await trio.sleep(0.01)
            await http_request(server, "GET", f"/ws?token={forged}", headers={
                "Upgrade": "websocket", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"})
            await http_request(server, "POST", "/api/publish", b'{"channel":"c","data":1}',
                               {"Authorization": "apikey backend-key-0123456789"})
    events = [r.fields for r in caplog.records if isinstance(getattr(r, "fields", None), dict)]  # type: ignore[attr-defined]
    opened = [f for f in events if f.get("event") == "open"]
    closed = [f for f in events if f.get("event") == "close"]
    assert len(opened) == 1 and len(closed) == 1
    assert opened[0]["conn"] == session and opened[0]["user"] == "alice" and opened[0]["remote"].startswith("127.0.0.1:")
    assert closed[0]["code"] == 1000 and closed[0]["user"] == "alice" and closed[0]["duration_s"] >= 0
    everything = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    for secret in (tok, forged, SECRET, "backend-key-0123456789"):
        assert secret not in everything


def test_serve_writes_json_lines() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") or k == "RELAY_PURE_PYTHON"}
    with subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--port", "0", "--log-format", "json"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True) as proc:
        try:
            assert proc.stderr is not None
            first = proc.stderr.readline()
            obj = json.loads(first)
            assert obj["level"] == "info" and obj["msg"].startswith("relay listening on ws://127.0.0.1:")
        finally:
            proc.terminate()
            proc.wait(10)
