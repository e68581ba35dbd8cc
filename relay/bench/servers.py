"""The servers ``relay bench`` measures (relay, the bundled peers, ``--against`` commands) and their processes.

Owns turning a spec into a pinned server process on 127.0.0.1, waiting for it to listen,
reading its CPU, memory and ``/metrics``, and stopping it. It never imports the server.
"""

from __future__ import annotations

import http.client
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .build import build_c_program
from .procfs import _taskset, free_port, proc_cpu_ns, proc_rss_kib
from .settings import (
    HOST,
    PEERS,
    RELAY_BENCH_ENV,
    SERVER_START_SECONDS,
    SERVER_STOP_SECONDS,
    SOURCE_ROOT,
    BenchError,
)

_LABEL_RE = re.compile(r"^([a-z0-9][a-z0-9_.-]{0,40})=(.+)$", re.DOTALL)


@dataclass
class ServerSpec:
    """A server to measure: a name and a command with ``{port}`` (and ``{python}``)."""

    name: str
    command: str
    env: dict[str, str] = field(default_factory=dict)
    unset_env: tuple[str, ...] = ()
    relay_impl: str | None = None  # "compiled" / "pure" for relay itself

    def argv(self, port: int) -> list[str]:
        return [a.replace("{port}", str(port)).replace("{python}", sys.executable) for a in shlex.split(self.command)]


def relay_spec(impl: str) -> ServerSpec:
    """Return the spec that runs this relay (the package this module belongs to)."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")])),
           **RELAY_BENCH_ENV}
    unset: tuple[str, ...] = ("RELAY_PURE_PYTHON",)
    if impl == "pure":
        env["RELAY_PURE_PYTHON"] = "1"
        unset = ()
    return ServerSpec(
        name=f"relay-{impl}",
        command="{python} -m relay serve --host 127.0.0.1 --port {port} --node-id bench",
        env=env,
        unset_env=unset,
        relay_impl=impl,
    )


def peer_specs() -> list[ServerSpec]:
    """Return the bundled peer servers of bench/peers (source checkout only)."""
    specs = []
    for name, rel in PEERS.items():
        path = SOURCE_ROOT / rel
        if not path.exists():
            raise BenchError(f"--peers needs {rel} from a relay source checkout; not found at {path}")
        if path.suffix == ".c":
            exe = build_c_program(path)
            specs.append(ServerSpec(name=name, command=f"{shlex.quote(str(exe))} --port {{port}}"))
        else:
            specs.append(ServerSpec(name=name, command=f"{{python}} {shlex.quote(str(path))} --port {{port}}"))
    return specs


def against_spec(text: str, index: int) -> ServerSpec:
    """Parse ``[label=]COMMAND``; the label defaults to the script or program name."""
    m = _LABEL_RE.match(text)
    label, command = (m.group(1), m.group(2)) if m else (None, text)
    if "{port}" not in command:
        raise BenchError(f"--against {text!r}: the command needs a {{port}} placeholder")
    if label is None:
        words = shlex.split(command)
        scripts = [w for w in words if w.endswith((".py", ".js", ".mjs"))]
        label = Path(scripts[0] if scripts else words[0]).stem or f"against{index}"
    return ServerSpec(name=label, command=command)


class Server:
    """A server process on 127.0.0.1:port, pinned with taskset; stopped by :meth:`stop`."""

    def __init__(self, spec: ServerSpec, cpus: str | None) -> None:
        self.spec = spec
        self.port = free_port()
        self.argv = _taskset(cpus) + spec.argv(self.port)
        env = dict(os.environ)
        for k in spec.unset_env:
            env.pop(k, None)
        env.update(spec.env)
        # Open for the server's lifetime (its stdout/stderr); closed and removed by stop().
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix=f"relay-bench-{spec.name}-", suffix=".log", delete=False)
        try:
            self.proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            self.log.close()
            os.unlink(self.log.name)
            raise BenchError(f"{spec.name}: cannot start {self.argv}: {exc}") from exc
        self.pid = self.proc.pid
        self.exit_code: int | None = None
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection((HOST, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BenchError(f"{self.spec.name} did not listen on port {self.port} within "
                         f"{SERVER_START_SECONDS:.0f} s ({self.argv}); its log:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")
        except OSError:
            return ""

    def cpu_ns(self) -> int | None:
        return proc_cpu_ns(self.pid)

    def rss_kib(self) -> int | None:
        return proc_rss_kib(self.pid)

    def metrics(self) -> dict[str, Any]:
        """relay only: the fast path it reports and its plain counters from /metrics."""
        if self.spec.relay_impl is None:
            return {}
        try:
            conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
            try:
                conn.request("GET", "/metrics")
                text = conn.getresponse().read().decode("utf-8", "replace")
            finally:
                conn.close()
        except OSError as exc:
            return {"error": f"cannot read /metrics: {exc}"}
        m = re.search(r'relay_info\{[^}]*fastpath="([^"]+)"', text)
        counters = {}
        for line in text.splitlines():
            if line.startswith(("#", "relay_info")) or "_bucket{" in line or "_created" in line:
                continue
            name, _, value = line.rpartition(" ")
            try:
                counters[name] = float(value)
            except ValueError:
                continue
        return {"fastpath": m.group(1) if m else None, "counters": counters}

    def stop(self) -> dict[str, Any]:
        """SIGTERM, then SIGKILL after SERVER_STOP_SECONDS; return the exit code and log facts."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(SERVER_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.exit_code = self.proc.returncode
        self.log.close()
        text = self.log_text()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass  # already removed
        noisy = [ln for ln in text.splitlines()
                 if any(w in ln for w in ("WARNING", "ERROR", "Traceback", "Exception", "CRITICAL"))]
        return {"exit_code": self.exit_code, "log_lines": len(text.splitlines()),
                "log_warning_count": len(noisy), "log_warnings": noisy[:20]}
