"""The shipped systemd unit (deploy/systemd/relay.service): systemd's own checker accepts it
without a warning, and it gives a drain the time it needs.

There is no systemd running here (a container), so the unit is not started; relay's
behaviour on the SIGTERM it sends (drain, exit 0) is tested with the real process in
tests/server/test_subprocess.py and through the proxies in test_rolling_restart.py.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import Config
from server.test_subprocess import INSTALLED_RELAY

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "relay.service"
SHIPPED_EXEC = "/opt/relay/bin/relay"


def _service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def _seconds(value: str) -> float:
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value.strip())
    assert found, f"unexpected time value {value!r}"
    number, unit = float(found.group(1)), found.group(2) or "s"
    return number * 60 if unit in ("min", "m") else number


def test_systemd_analyze_verify_accepts_the_unit_without_warnings(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (apt-get install systemd): it checks the shipped unit")
    text = UNIT.read_text()
    assert f"ExecStart={SHIPPED_EXEC} serve " in text
    # The unit names where docs/deployment.md installs relay; point it at a relay that
    # exists here (verify checks that the command is executable), nothing else changed.
    relay = INSTALLED_RELAY or shutil.which("relay") or str(Path(sys.executable).with_name("relay"))
    unit = tmp_path / "relay.service"
    unit.write_text(text.replace(SHIPPED_EXEC, relay))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), (
        done.returncode, done.stdout, done.stderr)


def test_a_typo_in_the_unit_would_be_caught(tmp_path: Path) -> None:
    """(The check above can fail: a misspelt key is reported.)"""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (apt-get install systemd)")
    relay = shutil.which("relay") or str(Path(sys.executable).with_name("relay"))
    unit = tmp_path / "relay.service"
    unit.write_text(UNIT.read_text().replace(SHIPPED_EXEC, relay).replace("KillMode=", "KilMode="))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "Unknown key 'KilMode'" in done.stderr, done.stderr


def test_stop_sends_sigterm_and_waits_longer_than_a_drain() -> None:
    service = _service()
    assert service["KillSignal"] == "SIGTERM"
    # mixed: SIGTERM to relay only; a final SIGKILL to what is left, after TimeoutStopSec
    assert service["KillMode"] == "mixed"
    defaults = Config()
    assert _seconds(service["TimeoutStopSec"]) > defaults.drain_timeout + defaults.drain_window, (
        service["TimeoutStopSec"], defaults.drain_timeout, defaults.drain_window)
    assert int(service["LimitNOFILE"]) >= 65536
