"""The ``relay`` command line: ``serve``, ``check-config``, ``version`` and ``bench``.

It parses arguments, loads the configuration (:func:`relay.config.load_config`), sets up
logging and hands over to the server. It owns no protocol logic; the server module is
imported only by ``serve`` so the other commands work without it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import fields
from importlib import metadata

from . import logs
from ._version import __version__
from .client_cli import add_client_commands
from .config import SECRET_KEYS, TABLE_KEYS, Config, load_config, redact_url
from .errors import ConfigError

LIBRARIES = ("trio", "trio-websocket", "wsproto", "h11", "msgpack")

EXIT_OK = 0
EXIT_USAGE = 2  # bad arguments or bad configuration, as argparse uses
EXIT_INTERRUPTED = 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="WebSocket relay server: channels, history and recovery over one port.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the server",
        description="Run the server. Flags beat RELAY_* environment variables, which beat the "
        "config file, which beats the defaults (see docs/configuration.md).",
    )
    _add_config_flags(serve)

    check = commands.add_parser(
        "check-config",
        help="validate the configuration and print the effective settings as TOML",
        description="Load the configuration exactly as 'serve' would, print the result as TOML "
        "and exit 0, or print the error and exit 2.",
    )
    _add_config_flags(check)

    commands.add_parser("version", help="print relay's version and those of its libraries")
    add_client_commands(commands)
    # Listed for --help only: main() hands "bench" and everything after it to relay.bench.
    commands.add_parser("bench", help="run the end-to-end load benchmark (relay bench --help)", add_help=False)
    return parser


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    # Values stay strings: load_config parses and checks them, so a bad --port gets the
    # same error format as a bad RELAY_PORT or a bad port in the file.
    parser.add_argument("--config", metavar="FILE", help="TOML config file (default: $RELAY_CONFIG)")
    parser.add_argument("--host", metavar="HOST", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", metavar="N", help="port to listen on, 0 picks a free one (default 8765)")
    parser.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error (default info)")
    parser.add_argument("--log-format", metavar="FORMAT", help="text (default) or json (one JSON object per line)")
    parser.add_argument("--node-id", metavar="ID", help="this node's id (default: generated at start)")
    parser.add_argument("--tls-cert", metavar="FILE", help="TLS certificate chain (PEM): serve wss:// and https://")
    parser.add_argument("--tls-key", metavar="FILE", help="TLS private key (PEM) of --tls-cert")
    parser.add_argument("--redis-url", metavar="URL", action="append",
                        help="Redis server (redis://, rediss://, or redis+sentinel://HOST:PORT,.../MASTER) "
                        "shared by every node; give it again to shard channels over several (default: none, "
                        "the in-memory broker)")
    parser.add_argument("--redis-cluster", action="store_true", default=None,
                        help="--redis-url names nodes of a Redis Cluster (sharded pub/sub, Redis 7+)")
    parser.add_argument("--insecure", action="store_true", default=None,
                        help="allow anonymous clients on a non-loopback address (no authentication configured)")


def _load(args: argparse.Namespace) -> Config | None:
    flags: dict[str, object] = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "node_id": args.node_id,
        "tls.cert": args.tls_cert,
        "tls.key": args.tls_key,
        "insecure": args.insecure,
        "redis_url": args.redis_url,
        "redis_cluster": args.redis_cluster,
    }
    try:
        return load_config(args.config, os.environ, flags)
    except ConfigError as exc:
        print(f"relay: config error: {exc}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return EXIT_USAGE
    logs.setup(config.log_level, config.log_format)

    import trio

    from relay.server.app import run_server  # lazy: only serve needs the server

    try:
        exit_code: int = trio.run(run_server, config)
    except ConfigError as exc:
        # Found when the server starts: unreadable key files, no auth on a public address.
        print(f"relay: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Ctrl+C that run_server did not turn into a drain: exit quietly, no traceback.
        return EXIT_INTERRUPTED
    return exit_code


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def _toml_item(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return _toml_value(value)


def _config_as_toml(config: Config) -> str:
    lines: list[str] = []
    for f in fields(config):
        if not f.init or f.name == "channels" or f.name in TABLE_KEYS:
            continue
        value = getattr(config, f.name)
        if f.name == "redis_url":
            value = tuple(redact_url(url) for url in value)  # never print a password
        lines.append(f"{f.name} = {_toml_item(value)}")
    for table in TABLE_KEYS:
        lines.append("")
        lines.append(f"[{table}]")
        section = getattr(config, table)
        for f in fields(section):
            value = getattr(section, f.name)
            if f"{table}.{f.name}" in SECRET_KEYS:
                # Never print a secret; say whether one is set.
                lines.append(f"# {f.name} = {'(set, hidden)' if value else '(not set)'}")
            else:
                lines.append(f"{f.name} = {_toml_item(value)}")
    for options in config.channels:
        lines.append("")
        lines.append("[[channels]]")
        for f in fields(options):
            lines.append(f"{f.name} = {_toml_value(getattr(options, f.name))}")
    return "\n".join(lines)


def _check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return EXIT_USAGE
    print(_config_as_toml(config))
    return EXIT_OK


def _library_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _version() -> int:
    from . import fastpath

    print(f"relay {__version__} (fastpath: {fastpath.IMPLEMENTATION})")
    for name in LIBRARIES:
        print(f"{name} {_library_version(name)}")
    print(f"Python {platform.python_version()} ({platform.python_implementation()})")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``relay`` command line and return the process exit code.

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` when None.

    Returns:
        0 on success, 2 for bad usage or a bad configuration, otherwise the server's code.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["bench"]:
        from .bench import main as bench_main  # lazy: only bench needs it

        return bench_main(args_list[1:])
    parser = _build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:
        # argparse exits after printing --help (code 0) or a usage error (code 2); return
        # the code instead so callers of main() get an int either way.
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "serve":
        return _serve(args)
    if args.command == "check-config":
        return _check_config(args)
    if args.command == "version":
        return _version()
    if args.command in ("sub", "pub"):
        return int(args.func(args))
    parser.print_help(sys.stderr)
    return EXIT_USAGE


__all__ = ["main"]
