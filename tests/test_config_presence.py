"""The presence options: presence, join_leave (needs presence), join_leave_interval,
join_leave_max_members per channel table, and presence_ttl at the top."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import ChannelOptions, load_config
from relay.errors import ConfigError


def _load(tmp_path: Path, table: str, top: str = "") -> ChannelOptions:
    path = tmp_path / "relay.toml"
    path.write_text(f'{top}\n[[channels]]\npattern = "lobby.*"\n{table}\n')
    return load_config(str(path), env={}).channel_options("lobby.1")


def test_presence_options_and_their_defaults(tmp_path: Path) -> None:
    assert ChannelOptions().presence is False and ChannelOptions().join_leave is False
    assert ChannelOptions().join_leave_interval == 0.0 and ChannelOptions().join_leave_max_members == 1000
    options = _load(tmp_path, "presence = true\njoin_leave = true\njoin_leave_interval = 0.5\n"
                              "join_leave_max_members = 0")
    assert (options.presence, options.join_leave, options.join_leave_interval,
            options.join_leave_max_members) == (True, True, 0.5, 0)
    cfg = load_config(None, env={"RELAY_PRESENCE_TTL": "2.5", "RELAY_CHANNELS":
                                 '[{"pattern": "x", "presence": true, "join_leave": true}]'})
    assert cfg.presence_ttl == 2.5 and cfg.channel_options("x").join_leave


@pytest.mark.parametrize(("table", "top", "key", "says"), [
    ("join_leave = true", "", "channels[0].join_leave", "presence = true"),
    ("presence = true\njoin_leave = true\njoin_leave_interval = -1", "", "channels[0].join_leave_interval",
     "seconds >= 0"),
    ("presence = true\njoin_leave_max_members = -5", "", "channels[0].join_leave_max_members", ">= 0"),
    ('presence = "yes"', "", "channels[0].presence", "true or false"),
    ("presence = true", "presence_ttl = 0", "presence_ttl", "> 0"),
], ids=["join-leave-without-presence", "interval", "cap", "not-bool", "ttl"])
def test_presence_errors_name_the_key_source_and_what_is_allowed(
        tmp_path: Path, table: str, top: str, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, table, top)
    assert info.value.key == key and "relay.toml" in str(info.value), str(info.value)
    assert says in str(info.value), str(info.value)
