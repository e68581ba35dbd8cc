"""Tests for the relay command line (relay.cli) and ``python -m relay``."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import types
from importlib import metadata
from pathlib import Path

import pytest

from relay import fastpath
from relay._version import __version__
from relay.cli import main
from relay.config import CONFIG_KEYS, ChannelOptions, Config, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the caller's RELAY_* settings out of these tests (RELAY_PURE_PYTHON may stay)."""
    for name in ["RELAY_CONFIG", *("RELAY_" + key.upper() for key in CONFIG_KEYS)]:
        monkeypatch.delenv(name, raising=False)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"relay {__version__} (fastpath: {fastpath.IMPLEMENTATION})"
    assert lines[1:6] == [
        f"{name} {metadata.version(name)}" for name in ("trio", "trio-websocket", "wsproto", "h11", "msgpack")
    ]
    assert lines[6].startswith(f"Python {sys.version_info.major}.{sys.version_info.minor}.")


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    captured = capsys.readouterr()
    assert "usage: relay" in captured.err
    assert "serve" in captured.err and "version" in captured.err


@pytest.mark.parametrize(
    ("argv", "code"),
    [(["--help"], 0), (["serve", "--help"], 0), (["frobnicate"], 2), (["serve", "--bogus"], 2)],
    ids=["help", "serve-help", "unknown-command", "unknown-flag"],
)
def test_argparse_exits_become_return_codes(argv: list[str], code: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == code
    capsys.readouterr()


def test_serve_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "missing.toml"
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relay: config error: ")
    assert f"file {path}" in err
    assert "No such file or directory" in err


def test_serve_missing_config_file_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "missing.toml"
    monkeypatch.setenv("RELAY_CONFIG", str(path))
    assert main(["serve"]) == 2
    assert "RELAY_CONFIG" in capsys.readouterr().err


def test_serve_bad_port_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "notanumber"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "relay: config error: flag --port: port = 'notanumber' is not allowed; expected an integer from 0 to 65535\n"
    )


def test_serve_bad_env(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RELAY_LOG_LEVEL", "chatty")
    assert main(["serve"]) == 2
    assert "environment variable RELAY_LOG_LEVEL: log_level = 'chatty'" in capsys.readouterr().err


def _fake_server(monkeypatch: pytest.MonkeyPatch, exit_code: int) -> list[Config]:
    """Install a stand-in relay.server.app whose run_server records its config."""
    seen: list[Config] = []

    async def run_server(config: Config) -> int:
        seen.append(config)
        return exit_code

    module = types.ModuleType("relay.server.app")
    module.run_server = run_server  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "relay.server.app", module)
    return seen


def test_serve_runs_the_server_with_merged_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = _fake_server(monkeypatch, exit_code=3)
    path = tmp_path / "relay.toml"
    path.write_text(
        'host = "0.0.0.0"\nport = 1000\nlog_level = "debug"\n[[channels]]\npattern = "p.*"\nmode = "state"\n'
    )
    monkeypatch.setenv("RELAY_PORT", "2000")
    monkeypatch.setenv("RELAY_NODE_ID", "from-env")
    argv = ["serve", "--config", str(path), "--port", "3000", "--log-level", "warning", "--node-id", "edge-7"]
    assert main(argv) == 3
    assert len(seen) == 1
    config = seen[0]
    assert (config.host, config.port, config.log_level, config.node_id) == ("0.0.0.0", 3000, "warning", "edge-7")
    assert config.channels == (ChannelOptions(pattern="p.*", mode="state", slow_consumer="conflate"),)
    capsys.readouterr()


def test_serve_host_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fake_server(monkeypatch, exit_code=0)
    assert main(["serve", "--host", "::", "--port", "0"]) == 0
    assert (seen[0].host, seen[0].port) == ("::", 0)


def test_check_config_prints_loadable_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RELAY_CHANNELS", '[{"pattern": "chat.*", "history_size": 7, "client_publish": false}]')
    assert main(["check-config", "--port", "0", "--node-id", "n1"]) == 0
    out = capsys.readouterr().out
    tomllib.loads(out)
    path = tmp_path / "effective.toml"
    path.write_text(out)
    monkeypatch.delenv("RELAY_CHANNELS")
    assert load_config(str(path)) == Config(
        port=0,
        node_id="n1",
        channels=(ChannelOptions(pattern="chat.*", history_size=7, client_publish=False),),
    )


def test_check_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[[channels]]\npattern = "chat.*"\nmode = "fast"\n')
    assert main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"relay: config error: file {path}: channels[0].mode = 'fast' is not allowed; "
        "expected one of stream, state, poke\n"
    )


def _run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_python_m_relay_version() -> None:
    result = _run_module("version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"relay {__version__} (fastpath: ")
    assert "trio-websocket " in result.stdout


def test_python_m_relay_config_error(tmp_path: Path) -> None:
    result = _run_module("serve", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2
    assert "relay: config error: file " in result.stderr
    assert "missing.toml" in result.stderr
