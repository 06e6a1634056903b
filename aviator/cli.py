"""The ``aviator`` command.

Each subcommand lives in its own module exposing ``configure(parser)`` and ``run(args) -> int``.
Every module is imported to build the parser (for ``--help``), so modules keep heavy imports
(plotting, gRPC) inside functions where they can.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Mapping, Sequence

from aviator import __version__, log

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("aviator.controlplane_cli", "run the control plane"),
    "bootstrap": ("aviator.envoy.bootstrap_cli", "print an Envoy bootstrap (YAML)"),
    "demo": ("aviator.demo", "run the whole system on this machine with a real Envoy"),
    "inspect": ("aviator.inspect", "show what an Envoy holds beside what Aviator measured"),
    "bench": ("aviator.bench", "run the benchmarks"),
}


class UsageError(Exception):
    """A user mistake the CLI reports in one line, without a traceback."""


def add_subcommands(
    parser: argparse.ArgumentParser,
    commands: Mapping[str, tuple[str, str]],
    *,
    dest: str,
    key: str,
) -> None:
    """One subparser per entry of ``commands`` (name → (module, help)); each module configures
    its own parser, and the chosen one is ``getattr(args, key)`` after parsing."""
    sub = parser.add_subparsers(dest=dest, required=True, metavar=dest.upper())
    for name, (module_name, help_text) in commands.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.configure(sp)
        sp.set_defaults(**{key: module})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aviator", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"aviator {__version__}")
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines")
    add_subcommands(parser, COMMANDS, dest="command", key="command_module")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Aviator starts subprocesses (Envoy, backends) while gRPC threads run; gRPC's fork
    # handlers then only print a warning. Must be set before grpc is first imported.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    log.configure(args.log_level, json=args.log_json)
    try:
        code: int = args.command_module.run(args)
    except UsageError as exc:
        print(f"aviator {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code
