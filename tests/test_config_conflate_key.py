"""The channel option conflate_key: implies the conflate policy, needs a stream channel."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import ChannelOptions, load_config
from relay.errors import ConfigError


def _load(tmp_path: Path, table: str) -> ChannelOptions:
    path = tmp_path / "relay.toml"
    path.write_text(f'[[channels]]\npattern = "ticks.*"\n{table}\n')
    cfg = load_config(str(path), env={})
    return cfg.channel_options("ticks.eq")


def test_conflate_key_implies_the_conflate_policy(tmp_path: Path) -> None:
    options = _load(tmp_path, 'conflate_key = "symbol"')
    assert options.conflate_key == "symbol" and options.slow_consumer == "conflate" and options.mode == "stream"
    assert ChannelOptions(conflate_key="symbol").slow_consumer == "conflate"
    assert _load(tmp_path, 'mode = "stream"').conflate_key == ""


@pytest.mark.parametrize(("table", "says"), [
    ('conflate_key = "symbol"\nslow_consumer = "drop"', 'slow_consumer = "drop"'),
    ('conflate_key = "symbol"\nmode = "state"', 'mode = "stream"'),
    ("conflate_key = 3", "a field name"),
])
def test_conflate_key_errors_name_the_key_and_the_problem(tmp_path: Path, table: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, table)
    assert "channels[0].conflate_key" in str(info.value) and says in str(info.value), str(info.value)
