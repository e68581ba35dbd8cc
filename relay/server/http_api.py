"""Plain-HTTP routes on the WebSocket port: health, readiness, metrics, publish, history.

Each route takes the parsed request and its body and returns a :class:`Response`;
the front door owns the socket and h11. Errors are JSON objects
``{"error": code, "message": text}`` with a matching HTTP status.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import trio

from ..core.codec import dumps_json, loads_json
from ..core.envelope import validate_channel
from ..core.history import Publication, publish_us
from ..errors import BadRequest, PeerError, Unavailable
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from . import stats

if TYPE_CHECKING:
    from .app import RelayServer

JSON_TYPE = "application/json"
HISTORY_PREFIX = "/api/channels/"
HISTORY_SUFFIX = "/history"


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(status: int, obj: Any) -> Response:
    return Response(status, dumps_json(obj) + b"\n", JSON_TYPE)


def error_response(status: int, code: str, message: str) -> Response:
    return json_response(status, {"error": code, "message": message})


_STATUS_BY_CODE = {"bad_request": 400, "forbidden": 403, "too_large": 413, "unknown_channel": 404}


async def route(server: RelayServer, method: str, target: str, body: bytes,
                headers: Sequence[tuple[bytes, bytes]] = ()) -> tuple[str, Response]:
    """Answer one request; return the route name (for metrics) and the response.

    ``headers`` are the request's (lower-case names, as h11 gives them); the publish and
    history routes check them for an API key or a token (``relay.server.security``).
    """
    path = urlsplit(target).path
    query = parse_qs(urlsplit(target).query, keep_blank_values=True)
    if path == "/healthz":
        return "healthz", _only_get(method) or Response(200, b"ok\n")
    if path == "/readyz":
        if (r := _only_get(method)) is not None:
            return "readyz", r
        if (why := server.not_ready()) is not None:
            return "readyz", Response(503, why.encode() + b"\n")
        return "readyz", Response(200, b"ready\n")
    if path == "/stats":
        return "stats", _only_get(method) or json_response(200, stats.snapshot(server))
    if path == "/":
        return "status", _only_get(method) or Response(
            200, stats.status_page(), "text/html; charset=utf-8", [("X-Content-Type-Options", "nosniff")])
    if path == "/metrics":
        return "metrics", _only_get(method) or Response(
            200, server.metrics.render(), METRICS_CONTENT_TYPE)
    if path == "/api/publish":
        if method != "POST":
            return "publish", _not_allowed("POST")
        refusal = server.security.check_origin(headers) or server.security.check_api_key(headers)
        if refusal is not None:
            return "publish", refusal
        return "publish", await _publish(server, body)
    if path.startswith(HISTORY_PREFIX) and path.endswith(HISTORY_SUFFIX):
        if (r := _only_get(method)) is not None:
            return "history", r
        channel = unquote(path[len(HISTORY_PREFIX):-len(HISTORY_SUFFIX)])
        refusal = server.security.check_reader(headers, target, channel)
        if refusal is not None:
            return "history", refusal
        return "history", await _history(server, channel, query)
    return "not_found", error_response(404, "not_found", f"no route for {path}")


def _only_get(method: str) -> Response | None:
    return None if method in ("GET", "HEAD") else _not_allowed("GET")


def _not_allowed(allowed: str) -> Response:
    r = error_response(405, "method_not_allowed", f"use {allowed}")
    r.headers.append(("Allow", allowed))
    return r


def read_publish_body(body: bytes, max_channel_length: int) -> tuple[str, dict[str, Any]]:
    """Parse a publish request's body ``{"channel": C, "data": D}``: the channel and the object.

    Raises:
        BadRequest: not JSON, not an object, no ``data``, or an invalid channel name.
    """
    try:
        obj = loads_json(body)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadRequest("body must be a JSON object with channel and data")
    if "data" not in obj:
        raise BadRequest("body needs a data field")
    return validate_channel(obj.get("channel"), max_channel_length), obj


async def _publish(server: RelayServer, body: bytes) -> Response:
    try:
        channel, obj = read_publish_body(body, server.config.max_channel_length)
        server.hub.check_publish(channel, obj["data"])
    except PeerError as exc:
        return error_response(_STATUS_BY_CODE.get(exc.code, 400), exc.code, exc.message)
    try:
        result = await server.hub.publish_wait(channel, obj["data"], trio.current_time())
    except Unavailable as exc:
        server.metrics.errors.labels(exc.code).inc()
        return error_response(503, exc.code, exc.message)
    server.metrics.published.labels("http").inc()
    return json_response(200, {"channel": channel, "offset": result.offset, "epoch": result.epoch})


def _int_param(query: dict[str, list[str]], name: str, minimum: int) -> int | None:
    values = query.get(name)
    if not values:
        return None
    try:
        value = int(values[-1])
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {values[-1][:32]!r}") from None
    if value < minimum:
        raise BadRequest(f"{name} must be >= {minimum}, got {value}")
    return value


def _publication(pub: Publication) -> dict[str, Any]:
    """One entry of a history answer: offset, data and (when known) ``ts``."""
    entry: dict[str, Any] = {"offset": pub.offset, "data": pub.data}
    if pub.ingress:
        entry["ts"] = publish_us(pub.ingress)
    return entry


async def _history(server: RelayServer, channel: str, query: dict[str, list[str]]) -> Response:
    try:
        validate_channel(channel, server.config.max_channel_length)
        since = _int_param(query, "since", 0)
        limit = _int_param(query, "limit", 1)
    except PeerError as exc:
        return error_response(400, exc.code, exc.message)
    try:
        found = await server.hub.history_wait(channel, trio.current_time(), since, limit)
    except Unavailable as exc:
        return error_response(503, exc.code, exc.message)
    if found is None:
        return error_response(404, "unknown_channel", f"channel {channel!r} has no messages")
    return json_response(200, {
        "channel": channel,
        "epoch": found.epoch,
        "offset": found.offset,
        "mode": found.mode,
        "publications": [_publication(p) for p in found.publications],
    })
