"""Tests for the [auth], [limits] and [tls] tables of relay.config, and secrets handling."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from relay.cli import main
from relay.config import AuthConfig, Config, LimitsConfig, TlsConfig, load_config
from relay.errors import ConfigError

SECRET = "0123456789abcdef0123456789abcdef"
KEY = "backend-key-0123456789"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "relay.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def error(*args: Any, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return info.value


def test_defaults() -> None:
    cfg = load_config()
    assert cfg.auth == AuthConfig() and not cfg.auth.jwt_configured
    assert cfg.limits == LimitsConfig(
        messages_per_second=100.0, messages_burst=200, bytes_per_second=1048576, bytes_burst=2097152,
        rate_limit_strikes=10, max_subscriptions=128, max_connections_per_ip=1000, max_connections=100000)
    assert cfg.tls == TlsConfig() and not cfg.tls.enabled
    assert cfg.insecure is False and cfg.log_format == "text"


def test_tables_from_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, f"""
[auth]
jwt_secret = "{SECRET}"
api_keys = ["{KEY}"]
allowed_origins = ["https://game.example.com", "https://*.example.com", "http://localhost:*"]
jwt_audience = "relay"

[limits]
messages_per_second = 100
bytes_per_second = 1048576
max_subscriptions = 128
max_connections_per_ip = 1000
max_connections = 100000

[tls]
cert = "/etc/relay/cert.pem"
key = "/etc/relay/key.pem"
""")
    cfg = load_config(path)
    assert cfg.auth.jwt_secret == SECRET and cfg.auth.jwt_configured
    assert cfg.auth.api_keys == (KEY,)
    assert cfg.auth.allowed_origins[1] == "https://*.example.com"
    assert cfg.auth.jwt_audience == "relay"
    assert cfg.limits.messages_per_second == 100.0 and cfg.limits.max_connections == 100000
    assert cfg.tls.enabled and cfg.tls.key == "/etc/relay/key.pem"


def test_environment_names_and_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nmessages_per_second = 5\nmax_subscriptions = 7\n")
    env = {
        "RELAY_AUTH_JWT_SECRET": SECRET,
        "RELAY_AUTH_API_KEYS": f"{KEY}, {KEY}2",
        "RELAY_AUTH_ALLOWED_ORIGINS": "https://a.example.com,https://b.example.com",
        "RELAY_LIMITS_MESSAGES_PER_SECOND": "50",
        "RELAY_LIMITS_MAX_CONNECTIONS": "0",
        "RELAY_TLS_CERT": "c.pem",
        "RELAY_TLS_KEY": "k.pem",
        "RELAY_INSECURE": "yes",
        "RELAY_LOG_FORMAT": "JSON",
    }
    cfg = load_config(path, env)
    assert cfg.auth.jwt_secret == SECRET
    assert cfg.auth.api_keys == (KEY, KEY + "2")
    assert cfg.auth.allowed_origins == ("https://a.example.com", "https://b.example.com")
    assert cfg.limits.messages_per_second == 50.0  # environment beats the file
    assert cfg.limits.max_subscriptions == 7  # the file's other key stays
    assert cfg.limits.max_connections == 0
    assert cfg.tls == TlsConfig("c.pem", "k.pem")
    assert cfg.insecure is True and cfg.log_format == "json"


def test_flags_for_tls_and_insecure() -> None:
    cfg = load_config(None, {}, {"tls.cert": "c.pem", "tls.key": "k.pem", "insecure": True})
    assert cfg.tls == TlsConfig("c.pem", "k.pem") and cfg.insecure


@pytest.mark.parametrize("key", ["auth.jwt_secret", "auth.api_keys"])
def test_secrets_are_refused_as_flags(key: str) -> None:
    exc = error(None, {}, {key: SECRET})
    assert "cannot be given as a flag" in str(exc) and SECRET not in str(exc)
    assert exc.key == key


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("[auth]\njwt_secert = 'x'\n", {}, ["unknown key 'jwt_secert' in auth", "did you mean 'jwt_secret'?"]),
        ("[limits]\nmessages_per_sec = 1\n", {}, ["unknown key 'messages_per_sec' in limits"]),
        ("auth = 5\n", {}, ["auth = 5 is not allowed", "a table ([auth] in TOML)"]),
        ("[limits]\nmax_connections = -1\n", {}, ["limits.max_connections = -1", "0 turns the limit off"]),
        ("[limits]\nmessages_burst = 0\n", {}, ["limits.messages_burst = 0"]),
        ("[auth]\nallowed_origins = ['https://a.example.com/path']\n", {}, ["auth.allowed_origins"]),
        ("[auth]\nallowed_origins = 'https://a.example.com'\n", {}, ["auth.allowed_origins"]),
        ("[auth]\napi_keys = ['short']\n", {}, ["auth.api_keys = (hidden)", "at least 16"]),
        ("", {"RELAY_LIMITS_MAX_SUBSCRIPTIONS": "many"}, ["environment variable RELAY_LIMITS_MAX_SUBSCRIPTIONS"]),
        ("", {"RELAY_INSECURE": "maybe"}, ["insecure = 'maybe'"]),
        ("", {"RELAY_AUTH_JWT_SECRET": "short-secret"}, ["auth.jwt_secret = (hidden)", "at least 32 bytes"]),
        (f"[auth]\njwt_secret = '{SECRET}'\njwt_secret_file = '/run/secret'\n", {},
         ["auth.jwt_secret_file is not allowed together with auth.jwt_secret"]),
        ("[tls]\ncert = 'c.pem'\n", {}, ["tls.cert is set but tls.key is not"]),
        ("", {"RELAY_TLS_KEY": "k.pem"}, ["environment variable RELAY_TLS_KEY: tls.key is set but tls.cert is not"]),
        ("log_format = 'xml'\n", {}, ["log_format = 'xml'", "text, json"]),
    ],
    ids=[
        "unknown-auth-key", "unknown-limits-key", "table-not-table", "negative-limit", "zero-burst",
        "origin-with-path", "origins-not-list", "short-api-key", "env-not-int", "env-bool", "short-secret",
        "secret-twice", "cert-without-key", "key-without-cert", "log-format",
    ],
)
def test_errors(tmp_path: Path, text: str, env: dict[str, str], expected: list[str]) -> None:
    exc = error(write(tmp_path, text), env)
    for part in expected:
        assert part in str(exc), (part, str(exc))
    assert "short-secret" not in str(exc)


def test_secrets_stay_out_of_repr() -> None:
    cfg = Config(auth=AuthConfig(jwt_secret=SECRET, api_keys=(KEY,)))
    assert SECRET not in repr(cfg) and KEY not in repr(cfg)


def test_check_config_never_prints_secrets(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RELAY_AUTH_JWT_SECRET", SECRET)
    monkeypatch.setenv("RELAY_AUTH_API_KEYS", KEY)
    monkeypatch.setenv("RELAY_LIMITS_MAX_CONNECTIONS", "5")
    assert main(["check-config", "--tls-cert", "c.pem", "--tls-key", "k.pem"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and KEY not in out
    assert "# jwt_secret = (set, hidden)" in out
    parsed = tomllib.loads(out)
    assert parsed["limits"]["max_connections"] == 5
    assert parsed["tls"] == {"cert": "c.pem", "key": "k.pem"}
    assert "jwt_secret" not in parsed["auth"]
