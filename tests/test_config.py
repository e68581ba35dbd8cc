"""Tests for relay.config: defaults, sources, precedence, channel options and every error path."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from relay import config as config_module
from relay.config import (
    DEFAULT_SLOW_CONSUMER,
    ChannelOptions,
    Config,
    effective_node_id,
    generate_node_id,
    load_config,
)
from relay.errors import ConfigError, RelayError


def write(tmp_path: Path, text: str, name: str = "relay.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- defaults


def test_defaults_without_any_source() -> None:
    assert load_config() == Config()
    assert load_config(None, {}, {}) == Config()


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("host", "127.0.0.1"),
        ("port", 8765),
        ("node_id", ""),
        ("log_level", "info"),
        ("heartbeat", 25.0),
        ("heartbeat_timeout", 10.0),
        ("handshake_timeout", 5.0),
        ("http_idle_timeout", 30.0),
        ("max_message_size", 65536),
        ("send_queue_size", 1048576),
        ("max_channel_length", 255),
        ("drain_timeout", 10.0),
        ("drain_window", 5.0),
        ("channels", ()),
    ],
    ids=lambda v: str(v),
)
def test_default_values(key: str, expected: object) -> None:
    assert getattr(load_config(), key) == expected


def test_default_channel_options() -> None:
    assert ChannelOptions() == ChannelOptions(
        pattern="*",
        mode="stream",
        history_size=100,
        history_ttl=300.0,
        client_publish=True,
        slow_consumer="disconnect",
    )


def test_unknown_relay_env_variables_are_ignored() -> None:
    env = {
        "RELAY_PURE_PYTHON": "1",
        "RELAY_BUILD_EXT": "yes",
        "RELAY_SOMETHING_ELSE": "x",
        "PORT": "1",
        "HOME": "/root",
    }
    assert load_config(None, env) == Config()


# --------------------------------------------------------------------------- each source


FILE_TEXT = """
host = "0.0.0.0"
port = 9000
node_id = "edge-1"
log_level = "debug"
heartbeat = 20          # an integer is fine for a float field
heartbeat_timeout = 7.5
handshake_timeout = 3
http_idle_timeout = 45.0
max_message_size = 1024
send_queue_size = 4096
max_channel_length = 100
drain_timeout = 0
drain_window = 2.5

[[channels]]
pattern = "prices.*"
mode = "state"
history_size = 1

[[channels]]
pattern = "chat.*"
history_size = 500
history_ttl = 3600
client_publish = false
slow_consumer = "drop"
"""


def test_file_sets_every_key(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FILE_TEXT))
    assert cfg == Config(
        host="0.0.0.0",
        port=9000,
        node_id="edge-1",
        log_level="debug",
        heartbeat=20.0,
        heartbeat_timeout=7.5,
        handshake_timeout=3.0,
        http_idle_timeout=45.0,
        max_message_size=1024,
        send_queue_size=4096,
        max_channel_length=100,
        drain_timeout=0.0,
        drain_window=2.5,
        channels=(
            ChannelOptions(pattern="prices.*", mode="state", history_size=1, slow_consumer="conflate"),
            ChannelOptions(
                pattern="chat.*",
                history_size=500,
                history_ttl=3600.0,
                client_publish=False,
                slow_consumer="drop",
            ),
        ),
    )
    assert isinstance(cfg.heartbeat, float)
    assert isinstance(cfg.handshake_timeout, float)


def test_env_sets_every_key() -> None:
    env = {
        "RELAY_HOST": "::1",
        "RELAY_PORT": "0",
        "RELAY_NODE_ID": "a.b_c-D9",
        "RELAY_LOG_LEVEL": "WARNING",
        "RELAY_HEARTBEAT": "1.5",
        "RELAY_HEARTBEAT_TIMEOUT": "2",
        "RELAY_HANDSHAKE_TIMEOUT": "0.25",
        "RELAY_HTTP_IDLE_TIMEOUT": "1e2",
        "RELAY_MAX_MESSAGE_SIZE": " 2048 ",
        "RELAY_SEND_QUEUE_SIZE": "8192",
        "RELAY_MAX_CHANNEL_LENGTH": "1024",
        "RELAY_DRAIN_TIMEOUT": "30",
        "RELAY_DRAIN_WINDOW": "0",
        "RELAY_CHANNELS": '[{"pattern": "game.*", "mode": "poke", "client_publish": false}]',
    }
    assert load_config(None, env) == Config(
        host="::1",
        port=0,
        node_id="a.b_c-D9",
        log_level="warning",
        heartbeat=1.5,
        heartbeat_timeout=2.0,
        handshake_timeout=0.25,
        http_idle_timeout=100.0,
        max_message_size=2048,
        send_queue_size=8192,
        max_channel_length=1024,
        drain_timeout=30.0,
        drain_window=0.0,
        channels=(ChannelOptions(pattern="game.*", mode="poke", client_publish=False, slow_consumer="conflate"),),
    )


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"host": "10.0.0.1"}, {"host": "10.0.0.1"}),
        ({"port": 1234}, {"port": 1234}),
        ({"port": "1234"}, {"port": 1234}),
        ({"log_level": "Error"}, {"log_level": "error"}),
        ({"node_id": "n-flag"}, {"node_id": "n-flag"}),
        ({"heartbeat": "3"}, {"heartbeat": 3.0}),
        ({"heartbeat": 3}, {"heartbeat": 3.0}),
        ({"channels": [{"pattern": "x.*"}]}, {"channels": (ChannelOptions(pattern="x.*"),)}),
        ({"host": None, "port": None}, {}),
    ],
    ids=["host", "port-int", "port-str", "log-level-case", "node-id", "float-str", "float-int", "channels", "none"],
)
def test_flags(flags: dict[str, object], expected: dict[str, Any]) -> None:
    assert load_config(None, {}, flags) == dataclasses.replace(Config(), **expected)


def test_config_path_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 1111\n")
    assert load_config(None, {"RELAY_CONFIG": path}).port == 1111


def test_explicit_path_beats_relay_config(tmp_path: Path) -> None:
    explicit = write(tmp_path, "port = 1111\n", "a.toml")
    from_env = write(tmp_path, "port = 2222\n", "b.toml")
    assert load_config(explicit, {"RELAY_CONFIG": from_env}).port == 1111


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()


# --------------------------------------------------------------------------- precedence

# (key, file value (TOML), env name + value, flag value, expected with file / +env / +flag)
PRECEDENCE = [
    ("port", "1001", ("RELAY_PORT", "1002"), "1003", (1001, 1002, 1003)),
    (
        "host",
        '"file.example"',
        ("RELAY_HOST", "env.example"),
        "flag.example",
        ("file.example", "env.example", "flag.example"),
    ),
    ("log_level", '"debug"', ("RELAY_LOG_LEVEL", "warning"), "error", ("debug", "warning", "error")),
    ("node_id", '"file"', ("RELAY_NODE_ID", "env"), "flag", ("file", "env", "flag")),
    ("heartbeat", "1.0", ("RELAY_HEARTBEAT", "2.0"), 3.0, (1.0, 2.0, 3.0)),
    ("drain_window", "1", ("RELAY_DRAIN_WINDOW", "2"), 0, (1.0, 2.0, 0.0)),
]


@pytest.mark.parametrize(
    ("key", "file_value", "env_item", "flag_value", "expected"),
    PRECEDENCE,
    ids=[row[0] for row in PRECEDENCE],
)
def test_precedence_flag_over_env_over_file_over_default(
    tmp_path: Path,
    key: str,
    file_value: str,
    env_item: tuple[str, str],
    flag_value: object,
    expected: tuple[object, object, object],
) -> None:
    path = write(tmp_path, f"{key} = {file_value}\n")
    env = dict([env_item])
    assert getattr(load_config(None, {}, {}), key) == getattr(Config(), key)
    assert getattr(load_config(path, {}, {}), key) == expected[0]
    assert getattr(load_config(path, env, {}), key) == expected[1]
    assert getattr(load_config(path, env, {key: flag_value}), key) == expected[2]
    # A None flag is "not given": the environment still wins over the file.
    assert getattr(load_config(path, env, {key: None}), key) == expected[1]


def test_precedence_is_per_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'host = "file.example"\nport = 1001\nheartbeat = 9\n')
    cfg = load_config(path, {"RELAY_PORT": "1002"}, {"heartbeat": 1.0})
    assert (cfg.host, cfg.port, cfg.heartbeat) == ("file.example", 1002, 1.0)


def test_env_channels_replace_file_channels(tmp_path: Path) -> None:
    path = write(tmp_path, '[[channels]]\npattern = "a.*"\n\n[[channels]]\npattern = "b.*"\n')
    cfg = load_config(path, {"RELAY_CHANNELS": '[{"pattern": "c.*", "mode": "state"}]'})
    assert cfg.channels == (ChannelOptions(pattern="c.*", mode="state", slow_consumer="conflate"),)


def test_send_queue_check_uses_merged_values(tmp_path: Path) -> None:
    # The file alone would be invalid (queue < 2 * message), the environment fixes it.
    path = write(tmp_path, "max_message_size = 1000\nsend_queue_size = 1500\n")
    cfg = load_config(path, {"RELAY_SEND_QUEUE_SIZE": "2000"})
    assert (cfg.max_message_size, cfg.send_queue_size) == (1000, 2000)


# --------------------------------------------------------------------------- channel options

CHANNELS_TOML = """
[[channels]]
pattern = "prices.*"
mode = "state"

[[channels]]
pattern = "prices.btc.*"
mode = "stream"

[[channels]]
pattern = "chat.[!_]*"
history_size = 1000

[[channels]]
pattern = "jobs.??"
mode = "poke"
"""


@pytest.mark.parametrize(
    ("channel", "expected_pattern"),
    [
        ("prices.eth", "prices.*"),
        ("prices.btc.usd", "prices.*"),  # first match wins over the more specific later table
        ("chat.lobby", "chat.[!_]*"),
        ("chat._internal", "*"),
        ("jobs.42", "jobs.??"),
        ("jobs.420", "*"),
        ("Prices.eth", "*"),  # matching is case-sensitive
        ("other", "*"),
        ("", "*"),
    ],
    ids=lambda v: repr(v),
)
def test_channel_options_first_match_wins(tmp_path: Path, channel: str, expected_pattern: str) -> None:
    cfg = load_config(write(tmp_path, CHANNELS_TOML))
    options = cfg.channel_options(channel)
    assert options.pattern == expected_pattern
    if expected_pattern == "*":
        assert options == ChannelOptions()


def test_channel_options_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "CHANNEL_CACHE_ENTRIES", 5)
    cfg = Config(channels=(ChannelOptions(pattern="a.*", mode="state"),))
    for i in range(20):
        assert cfg.channel_options(f"a.{i}").mode == "state"
        assert len(cfg._channel_cache) <= 5
    assert cfg.channel_options("a.19") is cfg.channels[0]


def test_channel_cache_does_not_affect_equality_or_hash() -> None:
    a = Config(channels=(ChannelOptions(pattern="a.*"),))
    b = Config(channels=(ChannelOptions(pattern="a.*"),))
    a.channel_options("a.1")
    assert a == b
    assert hash(a) == hash(b)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('mode = "stream"', "disconnect"),
        ('mode = "state"', "conflate"),
        ('mode = "poke"', "conflate"),
        ("", "disconnect"),
        ('mode = "state"\nslow_consumer = "drop"', "drop"),
        ('mode = "stream"\nslow_consumer = "conflate"', "conflate"),
        ('mode = "poke"\nslow_consumer = "disconnect"', "disconnect"),
    ],
    ids=["stream", "state", "poke", "no-mode", "state-explicit", "stream-explicit", "poke-explicit"],
)
def test_slow_consumer_defaults_by_mode(tmp_path: Path, table: str, expected: str) -> None:
    cfg = load_config(write(tmp_path, f'[[channels]]\npattern = "x"\n{table}\n'))
    assert cfg.channels[0].slow_consumer == expected


def test_default_slow_consumer_table() -> None:
    assert DEFAULT_SLOW_CONSUMER == {"stream": "disconnect", "state": "conflate", "poke": "conflate"}


# --------------------------------------------------------------------------- node id


def test_generate_node_id() -> None:
    ids = {generate_node_id() for _ in range(50)}
    assert len(ids) > 1
    for node_id in ids:
        assert re.fullmatch(r"n[0-9a-f]{6}", node_id)
        # A generated id is itself a valid configured node_id.
        assert load_config(None, {"RELAY_NODE_ID": node_id}).node_id == node_id


def test_effective_node_id() -> None:
    assert effective_node_id(Config(node_id="edge-1")) == "edge-1"
    assert re.fullmatch(r"n[0-9a-f]{6}", effective_node_id(Config()))


# --------------------------------------------------------------------------- errors

FILE = "file {path}"

# (file text, expected key, fragments the message must contain)
FILE_ERRORS = [
    ('port = "8765"', "port", ["port = '8765'", "an integer from 0 to 65535"]),
    ("port = true", "port", ["port = true", "an integer from 0 to 65535"]),
    ("port = 65536", "port", ["port = 65536", "an integer from 0 to 65535"]),
    ("port = -1", "port", ["port = -1", "an integer from 0 to 65535"]),
    ("port = 80.0", "port", ["port = 80.0", "an integer"]),
    ("host = 1", "host", ["host = 1", "a non-empty host name"]),
    ('host = ""', "host", ["host = ''", "a non-empty host name"]),
    ('node_id = "has space"', "node_id", ["node_id = 'has space'", "1 to 64 characters of A-Z a-z 0-9 . _ -"]),
    (f'node_id = "{"x" * 65}"', "node_id", ["node_id = ", "1 to 64 characters"]),
    ('log_level = "verbose"', "log_level", ["log_level = 'verbose'", "one of debug, info, warning, error"]),
    ("heartbeat = 0", "heartbeat", ["heartbeat = 0", "a number of seconds > 0"]),
    ("heartbeat = -1.5", "heartbeat", ["heartbeat = -1.5", "> 0"]),
    ("heartbeat = false", "heartbeat", ["heartbeat = false", "a number of seconds > 0"]),
    ("heartbeat = inf", "heartbeat", ["heartbeat = inf", "a number of seconds > 0"]),
    ("heartbeat = nan", "heartbeat", ["heartbeat = nan", "a number of seconds > 0"]),
    ('heartbeat_timeout = "10"', "heartbeat_timeout", ["heartbeat_timeout = '10'", "> 0"]),
    ("handshake_timeout = 0.0", "handshake_timeout", ["handshake_timeout = 0.0", "> 0"]),
    ("http_idle_timeout = 0", "http_idle_timeout", ["http_idle_timeout = 0", "> 0"]),
    ("max_message_size = 0", "max_message_size", ["max_message_size = 0", "an integer from 1 to 16777216"]),
    ("max_message_size = 16777217", "max_message_size", ["16777217", "an integer from 1 to 16777216"]),
    ("send_queue_size = 0", "send_queue_size", ["send_queue_size = 0", "an integer >= 1"]),
    ("max_channel_length = 0", "max_channel_length", ["max_channel_length = 0", "an integer from 1 to 1024"]),
    ("max_channel_length = 1025", "max_channel_length", ["1025", "an integer from 1 to 1024"]),
    ("drain_timeout = -0.1", "drain_timeout", ["drain_timeout = -0.1", "a number of seconds >= 0"]),
    ("drain_window = -1", "drain_window", ["drain_window = -1", ">= 0"]),
    (
        "prot = 1",
        "prot",
        ["unknown key 'prot'", "did you mean 'port'?", "allowed keys: host, port, node_id", "channels"],
    ),
    (
        "[server]\nport = 1",
        "server",
        ["unknown key 'server'", "allowed keys: host, port"],
    ),
    ('channels = "all"', "channels", ["channels = 'all'", "an array of channel tables"]),
    ('[channels]\npattern = "x"', "channels", ["channels = {'pattern': 'x'}", "an array of channel tables"]),
    ("channels = [1]", "channels[0]", ["channels[0] = 1", "a table with the keys pattern, mode"]),
    (
        '[[channels]]\npattern = "a"\n[[channels]]\npattern = "b"\nmode = "fast"',
        "channels[1].mode",
        ["channels[1].mode = 'fast' is not allowed; expected one of stream, state, poke"],
    ),
    (
        '[[channels]]\nmode = "state"',
        "channels[0].pattern",
        ["channels[0].pattern is missing", "a glob such as 'chat.*'"],
    ),
    (
        '[[channels]]\npattern = ""',
        "channels[0].pattern",
        ["channels[0].pattern = ''", "a non-empty glob", "it is empty"],
    ),
    (
        '[[channels]]\npattern = "chat.[abc"',
        "channels[0].pattern",
        ["channels[0].pattern = 'chat.[abc'", "never closed"],
    ),
    (
        '[[channels]]\npattern = "chat.\\u0001"',
        "channels[0].pattern",
        ["channels[0].pattern = 'chat.\\x01'", "control character"],
    ),
    ("[[channels]]\npattern = 5", "channels[0].pattern", ["channels[0].pattern = 5", "a glob"]),
    (
        '[[channels]]\npattern = "a.*"\n[[channels]]\npattern = "a.*"',
        "channels[1].pattern",
        ["channels[1].pattern = 'a.*'", "not already used by channels[0]"],
    ),
    (
        '[[channels]]\npattern = "a"\nhistroy_size = 5',
        "channels[0].histroy_size",
        [
            "unknown key 'histroy_size' in channels[0]",
            "did you mean 'history_size'?",
            "allowed keys: pattern, mode, history_size, history_ttl, client_publish, slow_consumer",
        ],
    ),
    ('[[channels]]\npattern = "a"\nhistory_size = -1', "channels[0].history_size", ["= -1", "an integer >= 0"]),
    ('[[channels]]\npattern = "a"\nhistory_size = 1.5', "channels[0].history_size", ["= 1.5", "an integer >= 0"]),
    ('[[channels]]\npattern = "a"\nhistory_size = true', "channels[0].history_size", ["= true", "an integer"]),
    ('[[channels]]\npattern = "a"\nhistory_ttl = 0', "channels[0].history_ttl", ["= 0", "> 0"]),
    ('[[channels]]\npattern = "a"\nclient_publish = 1', "channels[0].client_publish", ["= 1", "true or false"]),
    (
        '[[channels]]\npattern = "a"\nclient_publish = "yes"',
        "channels[0].client_publish",
        ["= 'yes'", "true or false"],
    ),
    (
        '[[channels]]\npattern = "a"\nslow_consumer = "block"',
        "channels[0].slow_consumer",
        ["= 'block'", "one of disconnect, drop, conflate"],
    ),
    (
        "max_message_size = 1000\nsend_queue_size = 1999",
        "send_queue_size",
        ["send_queue_size = 1999", "at least 2 * max_message_size = 2000", "max_message_size = 1000 from file"],
    ),
    (
        "max_message_size = 1048576",
        "max_message_size",
        [
            "max_message_size = 1048576",
            "at most send_queue_size / 2 = 524288",
            "send_queue_size = 1048576 from default",
        ],
    ),
]


@pytest.mark.parametrize(
    ("text", "key", "fragments"),
    FILE_ERRORS,
    ids=[f"{i:02d}-{row[1]}" for i, row in enumerate(FILE_ERRORS)],
)
def test_file_errors(tmp_path: Path, text: str, key: str, fragments: list[str]) -> None:
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    source = f"file {path}"
    assert message.startswith(f"{source}: "), message
    for fragment in fragments:
        assert fragment in message, message
    assert info.value.key == key
    assert info.value.source == source
    assert isinstance(info.value, RelayError)


def test_file_error_example_from_the_docs(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[channels]]\npattern = "prices.*"\n[[channels]]\npattern = "chat.*"\nmode = "fast"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"file {path}: channels[1].mode = 'fast' is not allowed; expected one of stream, state, poke"
    )


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"file {path}: cannot read the config file: No such file or directory"
    assert info.value.source == f"file {path}"
    assert info.value.key is None


def test_missing_file_named_by_relay_config(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError) as info:
        load_config(None, {"RELAY_CONFIG": path})
    assert f"file {path} (named by environment variable RELAY_CONFIG): cannot read" in str(info.value)


def test_unreadable_file_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value).startswith(f"file {tmp_path}: cannot read the config file: ")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("port = \n", ["invalid TOML", "(at line 1, column 8)"]),
        ('host = "a"\n\nport 8765\n', ["invalid TOML", "line 3"]),
        ("port = 1\nport = 2\n", ["invalid TOML", "line 2"]),
    ],
    ids=["missing-value", "missing-equals", "duplicate-key"],
)
def test_invalid_toml(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"file {path}: invalid TOML: ")
    for fragment in fragments:
        assert fragment in message, message
    assert info.value.source == f"file {path}"


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'host = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"file {path}: invalid TOML")


# (env, expected key, source, fragments)
ENV_ERRORS = [
    ({"RELAY_PORT": "notanumber"}, "port", "RELAY_PORT", ["port = 'notanumber'", "an integer from 0 to 65535"]),
    ({"RELAY_PORT": ""}, "port", "RELAY_PORT", ["port = ''", "an integer from 0 to 65535"]),
    ({"RELAY_PORT": "80.5"}, "port", "RELAY_PORT", ["port = '80.5'", "an integer"]),
    ({"RELAY_PORT": "70000"}, "port", "RELAY_PORT", ["port = '70000'", "from 0 to 65535"]),
    ({"RELAY_HEARTBEAT": "soon"}, "heartbeat", "RELAY_HEARTBEAT", ["heartbeat = 'soon'", "> 0"]),
    ({"RELAY_HEARTBEAT": "inf"}, "heartbeat", "RELAY_HEARTBEAT", ["heartbeat = 'inf'", "> 0"]),
    ({"RELAY_LOG_LEVEL": "trace"}, "log_level", "RELAY_LOG_LEVEL", ["one of debug, info, warning, error"]),
    ({"RELAY_NODE_ID": "a/b"}, "node_id", "RELAY_NODE_ID", ["node_id = 'a/b'", "1 to 64 characters"]),
    ({"RELAY_HOST": ""}, "host", "RELAY_HOST", ["host = ''", "a non-empty host name"]),
    (
        {"RELAY_CHANNELS": "[{pattern: 'x'}]"},
        "channels",
        "RELAY_CHANNELS",
        ["invalid JSON", "line 1 column 3", "a JSON array of channel tables"],
    ),
    ({"RELAY_CHANNELS": '{"pattern": "x"}'}, "channels", "RELAY_CHANNELS", ["an array of channel tables"]),
    (
        {"RELAY_CHANNELS": '[{"pattern": "x"}, {"pattern": "y", "mode": "fast"}]'},
        "channels[1].mode",
        "RELAY_CHANNELS",
        ["channels[1].mode = 'fast' is not allowed; expected one of stream, state, poke"],
    ),
    (
        {"RELAY_CHANNELS": '[{"pattern": "x", "client_publish": "false"}]'},
        "channels[0].client_publish",
        "RELAY_CHANNELS",
        ["channels[0].client_publish = 'false'", "true or false"],
    ),
    (
        {"RELAY_CHANNELS": '[{"pattern": "x", "history_size": 10.0}]'},
        "channels[0].history_size",
        "RELAY_CHANNELS",
        ["channels[0].history_size = 10.0", "an integer >= 0"],
    ),
    (
        {"RELAY_CHANNELS": '[{"pattern": "x", "ttl": 1}]'},
        "channels[0].ttl",
        "RELAY_CHANNELS",
        ["unknown key 'ttl' in channels[0]", "allowed keys: pattern, mode"],
    ),
    (
        {"RELAY_MAX_MESSAGE_SIZE": "1000", "RELAY_SEND_QUEUE_SIZE": "1000"},
        "send_queue_size",
        "RELAY_SEND_QUEUE_SIZE",
        [
            "send_queue_size = 1000",
            "at least 2 * max_message_size = 2000",
            "environment variable RELAY_MAX_MESSAGE_SIZE",
        ],
    ),
]


@pytest.mark.parametrize(
    ("env", "key", "variable", "fragments"),
    ENV_ERRORS,
    ids=[f"{i:02d}-{row[1]}" for i, row in enumerate(ENV_ERRORS)],
)
def test_env_errors(env: dict[str, str], key: str, variable: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env)
    message = str(info.value)
    source = f"environment variable {variable}"
    assert message.startswith(f"{source}: "), message
    for fragment in fragments:
        assert fragment in message, message
    assert info.value.key == key
    assert info.value.source == source


# (flags, expected key, flag, fragments)
FLAG_ERRORS = [
    ({"port": "notanumber"}, "port", "--port", ["port = 'notanumber'", "an integer from 0 to 65535"]),
    ({"port": True}, "port", "--port", ["port = true", "an integer from 0 to 65535"]),
    ({"port": 99999}, "port", "--port", ["port = 99999", "from 0 to 65535"]),
    ({"log_level": "loud"}, "log_level", "--log-level", ["log_level = 'loud'", "one of debug, info, warning, error"]),
    ({"node_id": ""}, "node_id", None, []),  # "" is allowed: it means "generate one"
    ({"host": 5}, "host", "--host", ["host = 5", "a non-empty host name"]),
    ({"max_message_size": 2_000_000}, "max_message_size", "--max-message-size", ["at most send_queue_size / 2"]),
    ({"colour": "red"}, "colour", "--colour", ["unknown key 'colour'", "allowed keys: host"]),
]


@pytest.mark.parametrize(
    ("flags", "key", "flag", "fragments"),
    FLAG_ERRORS,
    ids=[f"{i:02d}-{row[1]}" for i, row in enumerate(FLAG_ERRORS)],
)
def test_flag_errors(flags: dict[str, object], key: str, flag: str | None, fragments: list[str]) -> None:
    if flag is None:
        load_config(None, {}, flags)
        return
    with pytest.raises(ConfigError) as info:
        load_config(None, {}, flags)
    message = str(info.value)
    source = f"flag {flag}"
    assert message.startswith(f"{source}: "), message
    for fragment in fragments:
        assert fragment in message, message
    assert info.value.key == key
    assert info.value.source == source


def test_overridden_file_values_are_still_checked(tmp_path: Path) -> None:
    # A typo in the file is reported even when a flag would override the key.
    path = write(tmp_path, 'port = "x"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {}, {"port": 1})
    assert info.value.source == f"file {path}"


def test_long_bad_values_are_shortened() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"RELAY_PORT": "9" * 500})
    assert len(str(info.value)) < 200
    assert "..." in str(info.value)
