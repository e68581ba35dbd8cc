"""``relay bench``: the end-to-end load scenarios W1-W4, against relay and other servers.

Each measurement starts a fresh server process (relay, or any command given with
``--against``) pinned to its own CPU, drives it over loopback with the C load generator
``bench/load/cload.c`` (compiled on first use) pinned to the other CPUs, and reads the
server's CPU time and memory from ``/proc``. Scenarios:

* ``w1``: fan-out, 1,000 subscribers on one channel and one publisher; a rate sweep finds
  the highest deliveries/s with zero loss and p99 <= 10 ms, and reports the p99 at
  100,000 deliveries/s.
* ``w2``: a small room, 100 subscribers and 1,000 messages/s: p50/p99.
* ``w3``: 10,000 idle subscribed connections: server memory per connection (VmRSS).
* ``w4``: keyed conflation (relay only): a 10,000 messages/s feed of 500 symbols, fast
  subscribers that must get every update and a slow one whose per-symbol age is sampled, under
  ``conflate_key``, per-channel conflation and disconnect.

It owns processes, not protocol: it never imports the server. Everything it starts is
bounded in time and stopped in ``finally`` blocks; it only connects to 127.0.0.1.
See bench/load/README.md for what each number means.

The modules, each importing only those above it:

* ``settings``: :class:`Settings`, :class:`BenchError`, the constants, where the checkout is;
* ``procfs``: /proc readers (CPU time, VmRSS, jiffies, busy shares), taskset, free ports;
* ``build``: finding a C compiler and compiling cload.c and the C peers;
* ``servers``: server specs (relay, ``--peers``, ``--against``) and the server process;
* ``loaders``: the cload subscriber processes, JSON-line I/O, merging their results;
* ``report``: machine, version and git facts, the tables and the summary;
* ``keyed_client``: W4's measuring clients (a separate process; standard library only);
* ``conflation``: one W4 run per channel policy, its numbers and verdict;
* ``scenarios``: one fan-out or idle run, its verdict, W1-W3 (and W4 from ``conflation``);
* ``cli``: the command line (:func:`main`).

This package re-exports the names other code uses (``relay.cli``, tests, bench/load).
"""

from __future__ import annotations

from .build import build_c_program as build_c_program
from .build import build_cload as build_cload
from .build import cload_source as cload_source
from .build import find_compiler as find_compiler
from .cli import build_parser as build_parser
from .cli import main as main
from .cli import settings_from_args as settings_from_args
from .loaders import JsonLines as JsonLines
from .loaders import Loaders as Loaders
from .loaders import _hist_summary as _hist_summary
from .loaders import merge_sub_results as merge_sub_results
from .procfs import Jiffies as Jiffies
from .procfs import all_process_cpu as all_process_cpu
from .procfs import busy_share as busy_share
from .procfs import cpu_breakdown as cpu_breakdown
from .procfs import cpu_jiffies as cpu_jiffies
from .procfs import free_port as free_port
from .procfs import other_cpu as other_cpu
from .procfs import parse_cpus as parse_cpus
from .procfs import proc_cpu_ns as proc_cpu_ns
from .procfs import proc_rss_kib as proc_rss_kib
from .report import git_facts as git_facts
from .report import machine_facts as machine_facts
from .report import render as render
from .report import summarize as summarize
from .report import versions as versions
from .scenarios import SCENARIOS as SCENARIOS
from .scenarios import judge as judge
from .scenarios import run_fanout as run_fanout
from .scenarios import run_idle as run_idle
from .scenarios import scenario_w1 as scenario_w1
from .scenarios import scenario_w2 as scenario_w2
from .scenarios import scenario_w3 as scenario_w3
from .scenarios import scenario_w4 as scenario_w4
from .scenarios import verdict as verdict
from .scenarios import warnings as warnings
from .servers import Server as Server
from .servers import ServerSpec as ServerSpec
from .servers import against_spec as against_spec
from .servers import peer_specs as peer_specs
from .servers import relay_spec as relay_spec
from .settings import CLOAD_ENV as CLOAD_ENV
from .settings import HOST as HOST
from .settings import LIBRARIES as LIBRARIES
from .settings import P99_LIMIT_US as P99_LIMIT_US
from .settings import PACKAGE_DIR as PACKAGE_DIR
from .settings import PEERS as PEERS
from .settings import RELAY_BENCH_ENV as RELAY_BENCH_ENV
from .settings import SATURATED_LOADGEN_SHARE as SATURATED_LOADGEN_SHARE
from .settings import SERVER_START_SECONDS as SERVER_START_SECONDS
from .settings import SERVER_STOP_SECONDS as SERVER_STOP_SECONDS
from .settings import SOURCE_ROOT as SOURCE_ROOT
from .settings import W1_LADDER as W1_LADDER
from .settings import W1_REFERENCE_RATE as W1_REFERENCE_RATE
from .settings import BenchError as BenchError
from .settings import Settings as Settings
