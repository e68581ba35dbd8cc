"""The channel option ``delta``: state channels only, a boolean."""

from __future__ import annotations

import pytest

from relay.config import ConfigError, load_config


def _load(tmp_path, body: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "relay.toml"
    path.write_text(body)
    return load_config(path)


def test_delta_on_a_state_channel(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = _load(tmp_path, '[[channels]]\npattern = "game.*"\nmode = "state"\ndelta = true\n')
    assert cfg.channel_options("game.1").delta is True
    assert cfg.channel_options("other").delta is False


@pytest.mark.parametrize(("table", "expected"), [
    ('pattern = "feed.*"\ndelta = true', 'mode = "stream"'),
    ('pattern = "feed.*"\nmode = "poke"\ndelta = true', 'mode = "poke"'),
    ('pattern = "feed.*"\nmode = "state"\ndelta = "yes"', "true or false"),
], ids=["stream", "poke", "not-bool"])
def test_delta_elsewhere_is_refused(tmp_path, table: str, expected: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, f"[[channels]]\n{table}\n")
    message = str(info.value)
    assert "channels[0].delta" in message and expected in message and "relay.toml" in message
