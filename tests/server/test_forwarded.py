"""trusted_proxies: behind a trusted proxy the client address comes from X-Forwarded-For
(for per-address caps and logs); from anyone else the header is ignored, forged or not."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio
from websockets.exceptions import InvalidStatus

from relay.config import LimitsConfig, load_config
from relay.errors import ConfigError
from relay.server.forwarded import TrustedProxies

from .conftest import open_client, running_server

ONE_PER_ADDRESS = LimitsConfig(messages_per_second=0, bytes_per_second=0, max_connections_per_ip=1)


def xff(value: str) -> dict[str, Any]:
    return {"additional_headers": {"X-Forwarded-For": value}}


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_cap_and_log_line(
        caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(10), caplog.at_level(logging.INFO, logger="relay.server"):
        async with running_server(limits=ONE_PER_ADDRESS, trusted_proxies=("127.0.0.1",)) as server:
            async with open_client(server, **xff("198.51.100.1")), open_client(server, **xff("198.51.100.2")), \
                    open_client(server, **xff("6.6.6.6, 198.51.100.3")):  # a forged first hop is skipped
                # a second connection from the same forwarded client is over its cap
                with pytest.raises(InvalidStatus) as info:
                    async with open_client(server, **xff("198.51.100.2")):
                        pass
                assert info.value.response.status_code == 503
                # the proxy's own address is not a client: a request without the header
                # counts for 127.0.0.1 itself
                async with open_client(server):
                    pass
    remotes = {getattr(r, "fields", {}).get("remote") for r in caplog.records if getattr(r, "fields", {}).get("event") == "open"}
    assert {"198.51.100.1", "198.51.100.2", "198.51.100.3"} <= remotes, remotes
    assert "6.6.6.6" not in remotes


async def test_from_an_untrusted_peer_the_header_is_ignored() -> None:
    with trio.fail_after(10):
        async with running_server(limits=ONE_PER_ADDRESS) as server:  # no trusted_proxies
            async with open_client(server, **xff("198.51.100.1")):
                # a different forged address does not escape the cap of 127.0.0.1
                with pytest.raises(InvalidStatus) as info:
                    async with open_client(server, **xff("198.51.100.2")):
                        pass
                assert info.value.response.status_code == 503


@pytest.mark.parametrize(("peer", "header", "expected"), [
    ("127.0.0.1:5000", "203.0.113.7", "203.0.113.7"),
    ("127.0.0.1:5000", "203.0.113.7, 10.1.2.3", "203.0.113.7"),  # our inner proxy is skipped
    ("127.0.0.1:5000", "1.1.1.1, 203.0.113.7", "203.0.113.7"),  # whatever the client put first
    ("127.0.0.1:5000", "2001:db8::7", "[2001:db8::7]"),
    ("127.0.0.1:5000", "[2001:db8::7]:443", "[2001:db8::7]"),
    ("127.0.0.1:5000", "203.0.113.7:1234", "203.0.113.7"),
    ("127.0.0.1:5000", "not-an-address, 203.0.113.7", "203.0.113.7"),
    ("127.0.0.1:5000", "203.0.113.7, garbage", "127.0.0.1:5000"),  # unusable: keep the peer
    ("127.0.0.1:5000", "10.1.2.3", "127.0.0.1:5000"),  # only proxies: keep the peer
    ("192.0.2.9:5000", "203.0.113.7", "192.0.2.9:5000"),  # not a trusted proxy: ignored
    ("[::ffff:127.0.0.1]:5000", "203.0.113.7", "203.0.113.7"),
])
def test_the_client_is_the_rightmost_untrusted_hop(peer: str, header: str, expected: str) -> None:
    proxies = TrustedProxies(["127.0.0.0/8", "10.0.0.0/8"])
    assert proxies.client(peer, [(b"x-forwarded-for", header.encode())]) == expected


def test_several_header_lines_are_one_list_and_no_header_keeps_the_peer() -> None:
    proxies = TrustedProxies(["127.0.0.1"])
    headers = [(b"x-forwarded-for", b"1.1.1.1"), (b"host", b"x"), (b"x-forwarded-for", b"203.0.113.7")]
    assert proxies.client("127.0.0.1:1", headers) == "203.0.113.7"
    assert proxies.client("127.0.0.1:1", [(b"host", b"x")]) == "127.0.0.1:1"
    assert not TrustedProxies([]) and TrustedProxies(["::1"])


def test_trusted_proxies_from_the_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('trusted_proxies = ["10.0.0.0/8", "::1"]\n')
    assert load_config(str(path), env={}).trusted_proxies == ("10.0.0.0/8", "::1")
    assert load_config(None, env={"RELAY_TRUSTED_PROXIES": "127.0.0.1,192.168.0.0/16"}).trusted_proxies == (
        "127.0.0.1", "192.168.0.0/16")
    path.write_text('trusted_proxies = ["10.0.0.0/33"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert "trusted_proxies" in str(info.value) and "CIDR" in str(info.value)
