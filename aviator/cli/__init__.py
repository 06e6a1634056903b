"""The ``aviator`` command: one module per subcommand in this package.

Each subcommand module (``aviator.cli.run``, ``.bootstrap``, ``.inspect``, ``.demo``,
``.bench``) exposes ``configure(parser)`` and ``run(args) -> int``, and raises
:class:`~aviator.cli.usage.UsageError` for a user mistake. Only the chosen subcommand's module
is imported, so ``aviator --help`` and ``aviator bootstrap`` start without loading gRPC, the
benchmarks or the demo; a command whose optional extra is missing says which one to install.
Logging (structlog, ~0.15 s to import) is set up only for a command that logs: a module that
never logs says ``LOGS = False`` (``bootstrap``, whose output is the YAML on stdout).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Mapping, Sequence

from aviator import __version__
from aviator.cli.usage import UsageError

__all__ = ["COMMANDS", "UsageError", "add_subcommands", "build_parser", "main", "missing_for"]

# subcommand -> (module, one-line help, the extra it needs beyond the base install)
COMMANDS: dict[str, tuple[str, str, str | None]] = {
    "run": ("aviator.cli.run", "run the control plane", None),
    "bootstrap": ("aviator.cli.bootstrap", "print an Envoy bootstrap (YAML)", None),
    "inspect": (
        "aviator.cli.inspect",
        "show what an Envoy holds beside what Aviator measured",
        None,
    ),
    "demo": ("aviator.cli.demo", "run the whole system on this machine with a real Envoy", "demo"),
    "bench": ("aviator.cli.bench", "run the benchmarks", "bench"),
}


def _chosen(argv: Sequence[str], names: Sequence[str]) -> str | None:
    """The first argument that names a subcommand (options before it take no such value)."""
    return next((a for a in argv if a in names), None)


def missing_for(extra: str, *, dist: str = "aviator") -> list[str]:
    """The distributions ``dist[extra]`` needs that are not installed, from the installed
    metadata (presence only, not versions); ``[]`` when ``dist`` itself is not installed (a
    bare source tree: then a failing import says it, see :func:`add_subcommands`)."""
    from importlib import metadata

    try:
        requires = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return []
    missing: list[str] = []
    for requirement in requires:
        spec, _, marker = requirement.partition(";")
        if not re.search(rf"""extra\s*==\s*["']{re.escape(extra)}["']""", marker):
            continue
        found = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", spec)
        if found is None:
            continue
        name, extras = found.group(1), found.group(2)
        if re.sub(r"[-_.]+", "-", name).lower() == dist:  # aviator[bench] needs aviator[demo]
            for inner in (extras or "").split(","):
                missing += [m for m in missing_for(inner.strip(), dist=dist) if m not in missing]
            continue
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def _needs(name: str, extra: str, missing: str) -> UsageError:
    return UsageError(
        f"{name} needs the {extra!r} extra ({missing}): pip install 'aviator[{extra}]'"
    )


def add_subcommands(
    parser: argparse.ArgumentParser,
    commands: Mapping[str, tuple[str, str, str | None]],
    *,
    dest: str,
    key: str,
    argv: Sequence[str] | None = None,
) -> None:
    """One subparser per entry of ``commands`` (name → (module, help, extra)).

    Only the subcommand named in ``argv`` has its module imported and its parser configured
    (every one when ``argv`` is None, for documentation); the chosen module is
    ``getattr(args, key)`` after parsing. A module that cannot be imported because an
    optional dependency is missing becomes a :class:`UsageError` naming the extra: checked
    against the installed metadata first (a command may import without its extra and fail
    later, as the demo does without Envoy), then on import.
    """
    sub = parser.add_subparsers(dest=dest, required=True, metavar=dest.upper())
    chosen = None if argv is None else _chosen(argv, list(commands))
    for name, (module_name, help_text, extra) in commands.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if argv is not None and name != chosen:
            continue
        if extra is not None and (missing := missing_for(extra)):
            raise _needs(name, extra, f"not installed: {', '.join(missing)}")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if extra is None or (exc.name or "").startswith("aviator"):
                raise
            raise _needs(name, extra, f"{exc.name} is missing") from exc
        module.configure(sp)
        sp.set_defaults(**{key: module})


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aviator",
        description="Aviator: latency-aware load balancing for Envoy (an xDS control plane).",
    )
    parser.add_argument("--version", action="version", version=f"aviator {__version__}")
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines")
    add_subcommands(parser, COMMANDS, dest="command", key="command_module", argv=argv)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Aviator starts subprocesses (Envoy, backends) while gRPC threads run; gRPC's fork
    # handlers then only print a warning. Must be set before grpc is first imported.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(args_list)
    except UsageError as exc:
        print(f"aviator: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(args_list)
    logs = getattr(args.command_module, "LOGS", True)
    if logs:
        from aviator import log

        log.configure(args.log_level, json=args.log_json)
    try:
        code: int = args.command_module.run(args)
    except UsageError as exc:
        if logs and args.log_json:  # --log-json: stderr holds JSON lines only
            import structlog

            structlog.get_logger("aviator.cli").error(
                "usage error", command=args.command, error=str(exc)
            )
        else:
            print(f"aviator {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code
