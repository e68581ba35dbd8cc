"""Authentication from outside, over loopback: handshake refusals (401 with a reason),
permissions (error forbidden, the connection stays), refresh and expiry (close 4001),
API keys for the HTTP API, origins (403) and the safe default for public addresses."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relay.config import AuthConfig, Config
from relay.errors import ConfigError
from relay.server.app import RelayServer

from .conftest import Client, http_request, open_client, running_server

SECRET = "an-hs256-secret-of-at-least-32-bytes!"
API_KEY = "backend-key-0123456789"


def token(secret: str = SECRET, algorithm: str = "HS256", headers: dict[str, Any] | None = None,
          **claims: Any) -> str:
    body: dict[str, Any] = {"sub": "alice", "exp": time.time() + 60}
    body.update(claims)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, secret, algorithm=algorithm,
                      headers=headers)


def _b64(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def hand_signed(header: dict[str, Any], key: bytes, **claims: Any) -> str:
    body: dict[str, Any] = {"sub": "alice", "exp": time.time() + 60, **claims}
    signing_input = f"{_b64(header)}.{_b64(body)}"
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


def bearer(tok: str) -> dict[str, Any]:
    return {"additional_headers": {"Authorization": f"Bearer {tok}"}}


@asynccontextmanager
async def auth_server(**auth: Any) -> AsyncIterator[RelayServer]:
    auth.setdefault("jwt_secret", SECRET)
    auth.setdefault("api_keys", (API_KEY,))
    async with running_server(auth=AuthConfig(**auth)) as server:
        yield server


async def refused(server: RelayServer, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """Open a WebSocket that the server must refuse; return the status and the JSON body."""
    with pytest.raises(InvalidStatus) as info:
        async with open_client(server, **kwargs):
            pass
    response = info.value.response
    return response.status_code, json.loads(response.body)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _public_pem(private: Any) -> bytes:
    return private.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# --------------------------------------------------------------------------- handshake


async def test_valid_token_in_header_or_query_connects() -> None:
    with trio.fail_after(10):
        async with auth_server() as server:
            async with open_client(server, **bearer(token())) as c:
                assert (await c.request({"type": "ping", "ref": 1}))["type"] == "pong"
            async with open_client(server, uri_path=f"/ws?token={token()}") as c:
                assert (await c.request({"type": "ping", "ref": 1}))["type"] == "pong"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: {}, "missing"),
        (lambda: bearer("garbage"), "malformed"),
        (lambda: bearer(token(secret="another-secret-that-is-32-bytes-long")), "bad_signature"),
        (lambda: bearer(token(exp=time.time() - 5)), "expired"),
        (lambda: bearer(token(nbf=time.time() + 600)), "not_yet_valid"),
        (lambda: bearer(token(aud="some-other-service")), "wrong_audience"),
        (lambda: bearer(f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64({'sub': 'alice', 'exp': time.time() + 60})}."),
         "alg_none"),
        (lambda: bearer(token(exp=None)), "missing_claim"),
        (lambda: {"uri_path": "/ws?token=" + token(secret="another-secret-that-is-32-bytes-long")}, "bad_signature"),
    ],
    ids=["missing", "malformed", "forged", "expired", "not-yet-valid", "wrong-audience", "alg-none",
         "no-exp", "forged-in-query"],
)
async def test_bad_tokens_are_refused_before_the_upgrade(make: Any, reason: str) -> None:
    with trio.fail_after(10):
        async with auth_server() as server:
            status, body = await refused(server, **make())
            assert status == 401
            assert body["error"] == "unauthorized" and body["reason"] == reason, body
            assert server.connections == {}
            metrics = server.metrics.render().decode()
            assert f'relay_handshakes_refused_total{{reason="auth_{reason}"}} 1.0' in metrics


async def test_401_carries_www_authenticate_and_never_the_token() -> None:
    bad = token(secret="another-secret-that-is-32-bytes-long")
    with trio.fail_after(10):
        async with auth_server() as server:
            status, body, headers = await http_request(server, "GET", f"/ws?token={bad}", headers={
                "Upgrade": "websocket", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13"})
            assert status == 401
            assert headers["www-authenticate"].startswith('Bearer error="invalid_token"')
            assert bad.encode() not in body


async def test_audience_configured(rsa_key: rsa.RSAPrivateKey) -> None:
    with trio.fail_after(10):
        async with auth_server(jwt_audience="relay") as server:
            async with open_client(server, **bearer(token(aud="relay"))):
                pass
            status, body = await refused(server, **bearer(token(aud="billing")))
            assert (status, body["reason"]) == (401, "wrong_audience")
            status, body = await refused(server, **bearer(token()))
            assert (status, body["reason"]) == (401, "missing_claim")


async def test_rs256_public_key_and_hs_rs_confusion(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    pem = _public_pem(rsa_key)
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(pem)
    with trio.fail_after(10):
        async with auth_server(jwt_secret="", jwt_public_key_file=str(key_file)) as server:
            async with open_client(server, **bearer(token(secret=rsa_key, algorithm="RS256"))):  # type: ignore[arg-type]
                pass
            # HS256 "signed" with the server's public key as the HMAC secret.
            forged = hand_signed({"alg": "HS256", "typ": "JWT"}, pem)
            status, body = await refused(server, **bearer(forged))
            assert (status, body["reason"]) == (401, "algorithm_not_allowed")
            other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            status, body = await refused(server, **bearer(token(secret=other, algorithm="RS256")))  # type: ignore[arg-type]
            assert (status, body["reason"]) == (401, "bad_signature")


async def test_es256_from_a_jwks_file(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid="k1", alg="ES256")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    with trio.fail_after(10):
        async with auth_server(jwt_secret="", jwks_file=str(jwks)) as server:
            good = token(secret=key, algorithm="ES256", headers={"kid": "k1"})  # type: ignore[arg-type]
            async with open_client(server, **bearer(good)):
                pass
            unknown = token(secret=key, algorithm="ES256", headers={"kid": "k2"})  # type: ignore[arg-type]
            status, body = await refused(server, **bearer(unknown))
            assert (status, body["reason"]) == (401, "unknown_key")
            status, body = await refused(server, **bearer(token()))
            assert (status, body["reason"]) == (401, "algorithm_not_allowed")


async def test_secret_from_a_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    with trio.fail_after(10):
        async with auth_server(jwt_secret="", jwt_secret_file=str(secret_file)) as server:
            async with open_client(server, **bearer(token())):
                pass


def test_unreadable_or_unusable_key_files_stop_the_server(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="auth.jwt_secret_file.*cannot read"):
        RelayServer(Config(auth=AuthConfig(jwt_secret_file=str(tmp_path / "missing"))))
    short = tmp_path / "short"
    short.write_text("too short")
    with pytest.raises(ConfigError, match="at least 32"):
        RelayServer(Config(auth=AuthConfig(jwt_secret_file=str(short))))
    bad_pem = tmp_path / "bad.pem"
    bad_pem.write_text("not a key")
    with pytest.raises(ConfigError, match="auth.jwt_public_key_file.*not a PEM public key"):
        RelayServer(Config(auth=AuthConfig(jwt_public_key_file=str(bad_pem))))
    small = tmp_path / "small.pem"
    small.write_bytes(_public_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    with pytest.raises(ConfigError, match="auth.jwt_public_key_file: the key cannot be used: the RSA key has 1024 bits"):
        RelayServer(Config(auth=AuthConfig(jwt_secret=SECRET, jwt_public_key_file=str(small))))
    oct_jwks = tmp_path / "oct.json"
    oct_jwks.write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    with pytest.raises(ConfigError, match="auth.jwks_file: the key cannot be used: keys.0. is a symmetric"):
        RelayServer(Config(auth=AuthConfig(jwks_file=str(oct_jwks))))


# --------------------------------------------------------------------------- permissions


async def test_subscribe_and_publish_outside_the_claims_are_forbidden_and_the_connection_stays() -> None:
    tok = token(channels=["chat.*", "news"], publish=["chat.lobby"])
    with trio.fail_after(10):
        async with auth_server() as server, open_client(server, **bearer(tok)) as c:
            await c.subscribe("chat.lobby")
            await c.subscribe("news")
            answer = await c.request({"type": "subscribe", "channel": "admin.logs", "ref": 7})
            assert (answer["type"], answer["code"], answer["ref"]) == ("error", "forbidden", 7)
            answer = await c.request({"type": "subscribe", "channel": "newsroom", "ref": 8})
            assert (answer["code"], answer["ref"]) == ("forbidden", 8)
            answer = await c.request({"type": "publish", "channel": "news", "data": 1, "ref": 9})
            assert (answer["type"], answer["code"], answer["ref"]) == ("error", "forbidden", 9)
            ack = await c.request({"type": "publish", "channel": "chat.lobby", "data": "hi", "ref": 10})
            # the message to ourselves and the ack, in either order
            second = await c.recv()
            types = {ack["type"], second["type"]}
            assert types == {"message", "ack"}, (ack, second)
            assert (await c.request({"type": "ping", "ref": 11}))["type"] == "pong"
            metrics = server.metrics.render().decode()
            assert 'relay_errors_total{code="forbidden"} 3.0' in metrics


async def test_empty_claims_allow_nothing() -> None:
    with trio.fail_after(10):
        async with auth_server() as server, open_client(server, **bearer(token(channels=[], publish=[]))) as c:
            assert (await c.request({"type": "subscribe", "channel": "a", "ref": 1}))["code"] == "forbidden"
            assert (await c.request({"type": "publish", "channel": "a", "data": 1, "ref": 2}))["code"] == "forbidden"


# --------------------------------------------------------------------------- refresh and expiry


async def expect_close(c: Client, timeout: float) -> int:
    with trio.fail_after(timeout), pytest.raises(ConnectionClosed) as info:
        while True:
            await c.ws.recv()
    assert info.value.rcvd is not None
    return info.value.rcvd.code


async def test_expiry_closes_with_4001_at_the_expiry() -> None:
    with trio.fail_after(10):
        async with auth_server() as server:
            expires = time.time() + 1.0
            async with open_client(server, **bearer(token(exp=expires))) as c:
                await c.subscribe("a")
                assert await expect_close(c, 3) == 4001
                assert time.time() >= expires - 0.05


async def test_refresh_before_expiry_keeps_the_connection() -> None:
    with trio.fail_after(10):
        async with auth_server() as server:
            async with open_client(server, **bearer(token(exp=time.time() + 1.0))) as c:
                new_exp = int(time.time()) + 120
                answer = await c.request({"type": "refresh", "token": token(exp=new_exp), "ref": "r"})
                assert answer == {"type": "refreshed", "expires": new_exp, "ref": "r"}
                await c.expect_silence(1.5)  # past the first token's expiry: still open
                assert (await c.request({"type": "ping", "ref": 1}))["type"] == "pong"


async def test_refresh_with_a_bad_token_is_an_error_and_expiry_still_applies() -> None:
    with trio.fail_after(10):
        async with auth_server() as server:
            async with open_client(server, **bearer(token(exp=time.time() + 1.5))) as c:
                cases = [
                    (token(exp=time.time() - 1), "expired"),
                    (token(sub="mallory"), "wrong_user"),
                    (token(secret="another-secret-that-is-32-bytes-long"), "bad_signature"),
                ]
                for i, (tok, _reason) in enumerate(cases):
                    answer = await c.request({"type": "refresh", "token": tok, "ref": i})
                    assert (answer["type"], answer["code"], answer["ref"]) == ("error", "unauthorized", i), answer
                assert await expect_close(c, 3) == 4001


async def test_refresh_after_expiry_is_too_late() -> None:
    with trio.fail_after(10):
        async with auth_server() as server:
            async with open_client(server, **bearer(token(exp=time.time() + 0.5))) as c:
                await trio.sleep(0.8)
                try:
                    await c.send({"type": "refresh", "token": token(), "ref": 1})
                except ConnectionClosed:
                    pass  # already closed: just as good
                codes = []
                with trio.fail_after(3):
                    try:
                        while True:
                            msg = await c.recv()
                            assert msg["type"] == "error" and msg["code"] == "unauthorized", msg
                    except ConnectionClosed as exc:
                        codes.append(exc.rcvd.code if exc.rcvd else None)
                assert codes == [4001]


async def test_refresh_that_narrows_channels_ends_those_subscriptions() -> None:
    with trio.fail_after(10):
        async with auth_server() as server:
            async with open_client(server, **bearer(token(channels=["a", "b"]))) as c:
                await c.subscribe("a")
                await c.subscribe("b")
                await c.send({"type": "refresh", "token": token(channels=["a"]), "ref": 1})
                assert await c.recv() == {"type": "unsubscribed", "channel": "b"}
                assert (await c.recv())["type"] == "refreshed"
                assert server.hub.get("b") is not None and len(server.hub.get("b").members) == 0  # type: ignore[union-attr]


async def test_refresh_without_auth_is_a_bad_request(start_server: Any) -> None:
    with trio.fail_after(10):
        async with start_server() as server, open_client(server) as c:
            answer = await c.request({"type": "refresh", "token": "x", "ref": 1})
            assert (answer["code"], answer["ref"]) == ("bad_request", 1)


# --------------------------------------------------------------------------- HTTP API


async def _publish(server: RelayServer, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, body, _ = await http_request(server, "POST", "/api/publish",
                                         json.dumps({"channel": "c", "data": 1}).encode(), headers)
    return status, json.loads(body)


async def test_http_publish_needs_an_api_key() -> None:
    with trio.fail_after(10):
        async with auth_server() as server:
            status, body = await _publish(server)
            assert (status, body["reason"]) == (401, "missing")
            status, body = await _publish(server, {"Authorization": "apikey wrong-key-0123456789"})
            assert (status, body["reason"]) == (401, "bad_api_key")
            status, body = await _publish(server, {"Authorization": f"Bearer {token()}"})
            assert status == 401
            status, body = await _publish(server, {"Authorization": f"apikey {API_KEY}"})
            assert status == 200 and body["offset"] == 1


async def test_http_publish_with_tokens_but_no_keys_is_refused() -> None:
    with trio.fail_after(10):
        async with auth_server(api_keys=()) as server:
            status, body = await _publish(server)
            assert status == 401 and "none is configured" in body["message"]


async def test_api_keys_from_a_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# backends\n{API_KEY}\n\nsecond-key-0123456789\n")
    with trio.fail_after(10):
        async with auth_server(api_keys=(), api_keys_file=str(keys)) as server:
            assert (await _publish(server, {"Authorization": "apikey second-key-0123456789"}))[0] == 200
            assert (await _publish(server, {"Authorization": "apikey third-key-0123456789"}))[0] == 401


async def test_history_needs_a_key_or_a_token_for_that_channel() -> None:
    with trio.fail_after(10):
        async with auth_server() as server:
            assert (await _publish(server, {"Authorization": f"apikey {API_KEY}"}))[0] == 200
            path = "/api/channels/c/history"
            assert (await http_request(server, "GET", path))[0] == 401
            assert (await http_request(server, "GET", path, headers={"Authorization": f"apikey {API_KEY}"}))[0] == 200
            assert (await http_request(server, "GET", f"{path}?token={token(channels=['c'])}"))[0] == 200
            status, body, _ = await http_request(server, "GET", f"{path}?token={token(channels=['d'])}")
            assert status == 403 and json.loads(body)["error"] == "forbidden"


async def test_health_and_metrics_stay_open() -> None:
    with trio.fail_after(10):
        async with auth_server() as server:
            assert (await http_request(server, "GET", "/healthz"))[0] == 200
            assert (await http_request(server, "GET", "/metrics"))[0] == 200


# --------------------------------------------------------------------------- origins


async def test_allowed_origins() -> None:
    origins = ("https://game.example.com", "https://*.example.org", "http://localhost:*")
    with trio.fail_after(10):
        async with auth_server(allowed_origins=origins) as server:
            for origin in ("https://game.example.com", "https://a.example.org", "https://a.b.example.org",
                           "http://localhost:3000"):
                async with open_client(server, origin=origin, **bearer(token())):
                    pass
            for origin in ("https://evil.example.com", "https://example.org", "https://evilexample.org",
                           "http://game.example.com", "https://game.example.com.evil.net",
                           "http://localhost:3000.evil.net", "null"):
                status, body = await refused(server, origin=origin, **bearer(token()))
                assert (status, body["error"], body["reason"]) == (403, "forbidden", "origin"), origin
            async with open_client(server, **bearer(token())):  # no Origin: not a browser
                pass


async def test_default_is_same_origin_only(start_server: Any) -> None:
    with trio.fail_after(10):
        async with start_server() as server:
            async with open_client(server, origin=f"http://127.0.0.1:{server.port}"):
                pass
            status, body = await refused(server, origin="https://evil.example.com")
            assert status == 403 and "same origin" in body["message"]
            # a cross-site form post cannot publish either
            status, body, _ = await http_request(
                server, "POST", "/api/publish", b'{"channel": "c", "data": 1}',
                {"Origin": "https://evil.example.com", "Content-Type": "text/plain"})
            assert status == 403


# --------------------------------------------------------------------------- safe defaults


def test_public_address_without_auth_needs_insecure(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match="not a loopback address.*--insecure"):
        RelayServer(Config(host="0.0.0.0"))
    with caplog.at_level(logging.WARNING, logger="relay.security"):
        RelayServer(Config(host="0.0.0.0", insecure=True))
    assert any("insecure" in r.getMessage() for r in caplog.records)
    RelayServer(Config(host="::1"))
    RelayServer(Config(host="localhost"))
    RelayServer(Config(host="0.0.0.0", auth=AuthConfig(jwt_secret=SECRET)))


def test_serve_refuses_a_public_address_without_auth(capsys: pytest.CaptureFixture[str]) -> None:
    from relay.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relay: config error:") and "--insecure" in err
