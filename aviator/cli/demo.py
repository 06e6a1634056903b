"""``aviator demo``: the whole system on this machine with a real Envoy."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from aviator import log as aviator_log
from aviator.cli.usage import UsageError
from aviator.demo.scenario import (
    DEFAULT_BACKEND_PORT,
    DEFAULT_FIRST_ADDRESS,
    PODS,
    SLOWED_POD,
    pick_addresses,
    port_free,
)
from aviator.demo.session import (
    DEFAULT_DURATION_S,
    DEFAULT_GATEWAY_PORT,
    DEFAULT_INTERVAL_S,
    DEFAULT_RATE,
    DemoOptions,
    run_demo,
)
from aviator.demo.stack import DemoError
from aviator.envoy.process import free_port
from aviator.testbed.openloop import raise_fd_limit


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION_S,
        metavar="SECONDS",
        help=f"how long the load runs; {SLOWED_POD} is slow in the middle third "
        f"(default {DEFAULT_DURATION_S:g})",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_RATE,
        metavar="RPS",
        help=f"offered load, requests per second, Poisson arrivals (default {DEFAULT_RATE:g})",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=DEFAULT_INTERVAL_S,
        metavar="SECONDS",
        help=f"refresh period of the live table (default {DEFAULT_INTERVAL_S:g})",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="write the objects (DIR/source) and Envoy's config and log (DIR/envoy) here and "
        "keep them (default: a temporary directory, removed at the end)",
    )
    parser.add_argument(
        "--json-summary",
        type=Path,
        metavar="FILE",
        help="also write the summary, every frame and the pids the demo started as JSON",
    )
    parser.add_argument(
        "--first-address",
        default=DEFAULT_FIRST_ADDRESS,
        metavar="127.0.0.N",
        help=f"first backend address; busy ones are skipped (default {DEFAULT_FIRST_ADDRESS})",
    )
    parser.add_argument(
        "--backend-port",
        type=int,
        default=DEFAULT_BACKEND_PORT,
        metavar="PORT",
        help=f"the backends' port (default {DEFAULT_BACKEND_PORT})",
    )
    parser.add_argument(
        "--gateway-port",
        type=int,
        metavar="PORT",
        help=f"Envoy's listener on 127.0.0.1 (default {DEFAULT_GATEWAY_PORT}, or a free port "
        "if that one is busy)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of arrivals and service times")


def options_from(args: argparse.Namespace) -> DemoOptions:
    """Check the arguments and pick free addresses; :class:`UsageError` on any problem."""
    if not 0 < args.backend_port < 65536:
        raise UsageError(f"--backend-port must be in 1..65535, got {args.backend_port}")
    if args.json_summary is not None and not args.json_summary.parent.is_dir():
        raise UsageError(f"--json-summary: no directory {str(args.json_summary.parent)!r}")
    if args.gateway_port is None:
        gateway_port = (
            DEFAULT_GATEWAY_PORT
            if port_free("127.0.0.1", DEFAULT_GATEWAY_PORT)
            else free_port("127.0.0.1")
        )
    else:
        gateway_port = args.gateway_port
        if not 0 < gateway_port < 65536:
            raise UsageError(f"--gateway-port must be in 1..65535, got {gateway_port}")
        if not port_free("127.0.0.1", gateway_port):
            raise UsageError(f"--gateway-port {gateway_port}: 127.0.0.1:{gateway_port} is busy")
    try:
        hosts = pick_addresses(len(PODS), first=args.first_address, port=args.backend_port)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        return DemoOptions(
            duration_s=args.duration,
            rate=args.rate,
            interval_s=args.interval,
            hosts=tuple(hosts),
            backend_port=args.backend_port,
            gateway_port=gateway_port,
            workdir=args.workdir,
            json_summary=args.json_summary,
            seed=args.seed,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _quiet_logs(args: argparse.Namespace) -> None:
    # The table is the demo's output: at the default level only warnings are logged (to
    # stderr); --log-level debug (or warning, error) is taken as given.
    if getattr(args, "log_level", "info") == "info":
        aviator_log.configure("warning", json=getattr(args, "log_json", False))
        logging.getLogger().setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    _quiet_logs(args)
    options = options_from(args)
    raise_fd_limit()
    try:
        return asyncio.run(run_demo(options, out=sys.stdout))
    except DemoError as exc:
        print(f"aviator demo: {exc}", file=sys.stderr)
        return 1
