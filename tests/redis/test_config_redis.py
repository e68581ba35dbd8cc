"""The redis_url key: flags, environment and file, and clear errors for bad URLs."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import load_config, redact_url
from relay.errors import ConfigError


def test_redis_url_comes_from_a_flag_the_environment_or_the_file(tmp_path: Path) -> None:
    assert load_config(env={}).redis_url == ()
    assert load_config(flags={"redis_url": ["redis://a:1/0", "rediss://b"]}).redis_url == (
        "redis://a:1/0", "rediss://b")
    assert load_config(env={"RELAY_REDIS_URL": "redis://a:1, redis://b:2"}).redis_url == (
        "redis://a:1", "redis://b:2")
    path = tmp_path / "relay.toml"
    path.write_text('redis_url = "redis://user:pw@h:6390/3"\n')
    assert load_config(str(path)).redis_url == ("redis://user:pw@h:6390/3",)
    path.write_text('redis_url = ["redis://h1", "redis://h2"]\n')
    assert load_config(str(path)).redis_url == ("redis://h1", "redis://h2")


@pytest.mark.parametrize(("url", "says"), [
    ("http://h:1", "scheme must be redis:// or rediss://"),
    ("h:6379", "scheme must be redis:// or rediss://"),
    ("redis://", "no host"),
    ("redis://h:99999", "Port out of range"),
    ("redis://h:0", "port 0"),
    ("redis://h/abc", "database number"),
    ("redis://h/0?timeout=1", "query options"),
], ids=["http", "no-scheme", "no-host", "port-range", "port-0", "db", "query"])
def test_a_bad_redis_url_is_refused_with_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(flags={"redis_url": [url]})
    assert says in str(info.value) and "flag --redis-url" in str(info.value)
    assert info.value.key == "redis_url"


def test_a_password_never_shows_in_an_error_and_duplicates_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"RELAY_REDIS_URL": "redis://u:hunter2@h:99999"})
    assert "hunter2" not in str(info.value) and "u:***@h" in str(info.value)
    with pytest.raises(ConfigError, match="the same URL is given twice"):
        load_config(flags={"redis_url": ["redis://h", "redis://h"]})
    assert redact_url("rediss://:pw@h:1/2") == "rediss://:***@h:1/2"
    assert redact_url("redis://h") == "redis://h"


def test_redis_cluster_needs_seed_urls() -> None:
    assert load_config(flags={"redis_cluster": True, "redis_url": ["redis://h:7000"]}).redis_cluster is True
    assert load_config(env={"RELAY_REDIS_CLUSTER": "yes", "RELAY_REDIS_URL": "redis://h:7000"}).redis_cluster
    with pytest.raises(ConfigError, match="redis_cluster = true needs redis_url") as info:
        load_config(flags={"redis_cluster": True})
    assert info.value.key == "redis_cluster"
