"""The redis_url key: flags, environment and file, and clear errors for bad URLs."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import SentinelUrl, load_config, parse_sentinel_url, redact_url
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
    ("http://h:1", "scheme must be redis://, rediss:// (TLS) or redis+sentinel://"),
    ("h:6379", "scheme must be redis://, rediss:// (TLS) or redis+sentinel://"),
    ("redis://", "no host"),
    ("redis://h:99999", "Port out of range"),
    ("redis://h:0", "port 0"),
    ("redis://h/abc", "database number"),
    ("redis://h/0?timeout=1", "query options"),
    ("redis+sentinel://s1:26379", "the path must be /MASTER"),
    ("redis+sentinel://s1/m/0/1", "the path must be /MASTER"),
    ("redis+sentinel://s1/m/x", "the database must be a number"),
    ("redis+sentinel://s1,/m", "no host in the sentinel address"),
    ("redis+sentinel://s1:0/m", "port 0"),
    ("redis+sentinel://s1:99999/m", "Port out of range"),
    ("redis+sentinel://s1/m?timeout=1", "query option 'timeout' is not supported"),
    ("redis+sentinel://s1/m?sentinel_password=a&sentinel_password=b", "is given twice"),
], ids=["http", "no-scheme", "no-host", "port-range", "port-0", "db", "query", "sentinel-no-master",
        "sentinel-long-path", "sentinel-db", "sentinel-empty-host", "sentinel-port-0", "sentinel-port-range",
        "sentinel-query", "sentinel-twice"])
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


def test_a_sentinel_url_names_the_sentinels_and_the_master_and_survives_the_comma_split() -> None:
    url = "redis+sentinel://app:s%40cret@10.0.0.1:26379,10.0.0.2,[::1]:26380/orders/2"
    assert load_config(flags={"redis_url": [url]}).redis_url == (url,)
    # RELAY_REDIS_URL is split at commas: the sentinel list is put back together.
    env = load_config(env={"RELAY_REDIS_URL": f"{url}, redis://other:6379"})
    assert env.redis_url == (url, "redis://other:6379")
    got = parse_sentinel_url(url)
    assert got == SentinelUrl((("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380)), "orders", 2,
                              "app", "s@cret", False)
    assert parse_sentinel_url("rediss+sentinel://s/m").tls and parse_sentinel_url("rediss+sentinel://s/m").db == 0
    guarded = parse_sentinel_url("redis+sentinel://s/m?sentinel_username=watch&sentinel_password=p%26w")
    assert (guarded.sentinel_username, guarded.sentinel_password, guarded.password) == ("watch", "p&w", None)
    assert redact_url("redis+sentinel://:pw@s/m?sentinel_username=watch&sentinel_password=p%26w") == (
        "redis+sentinel://:***@s/m?sentinel_username=watch&sentinel_password=***")
    with pytest.raises(ConfigError) as info:
        load_config(env={"RELAY_REDIS_URL": "redis+sentinel://:hunter2@s1,s2"})
    assert "hunter2" not in str(info.value) and "the path must be /MASTER" in str(info.value)
    with pytest.raises(ConfigError, match="does not go with a redis[+]sentinel:// URL") as info:
        load_config(flags={"redis_cluster": True, "redis_url": ["redis+sentinel://s/m"]})
    assert info.value.key == "redis_cluster"
