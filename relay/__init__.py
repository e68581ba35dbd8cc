"""relay: a WebSocket relay server for latency-sensitive games and trading feeds.

Public API::

    from relay import Config, load_config, RelayServer

    async with trio.open_nursery() as nursery:
        server = await nursery.start(RelayServer(load_config()).run)
        ...
        await server.drain()
"""

from __future__ import annotations

from ._version import __version__ as __version__
from .config import ChannelOptions as ChannelOptions
from .config import Config as Config
from .config import load_config as load_config
from .errors import BadRequest as BadRequest
from .errors import ConfigError as ConfigError
from .errors import Forbidden as Forbidden
from .errors import PeerError as PeerError
from .errors import RelayError as RelayError
from .errors import TooLarge as TooLarge
from .server.app import RelayServer as RelayServer
from .server.app import run_server as run_server
from .client import connect as connect

__all__ = [
    "__version__", "connect", "ChannelOptions", "Config", "load_config", "RelayServer", "run_server",
    "RelayError", "ConfigError", "PeerError", "BadRequest", "Forbidden", "TooLarge",
]
