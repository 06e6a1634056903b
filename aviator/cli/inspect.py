"""``aviator inspect``: what an Envoy holds beside what Aviator measured; with ``--csds``, what
every proxy connected to a control plane holds, by the control plane's CSDS."""

from __future__ import annotations

import argparse
import json
import os
import sys

from aviator.cli.usage import UsageError

# aiohttp and Envoy's protobufs (about a second to import) are loaded by run(), not by
# `aviator inspect --help`.


def _url(text: str, flag: str) -> str:
    if "://" not in text:
        text = f"http://{text}"
    if not text.startswith(("http://", "https://")) or len(text.split("://", 1)[1]) == 0:
        raise UsageError(f"{flag} must be an http(s) URL like http://127.0.0.1:9901, got {text!r}")
    return text.rstrip("/")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--envoy-admin",
        metavar="URL",
        help="Envoy's admin address, e.g. http://127.0.0.1:9901",
    )
    parser.add_argument(
        "--csds",
        metavar="HOST:PORT",
        help="instead of one Envoy's admin: ask the control plane's CSDS (its --xds-address) "
        "what every connected proxy holds and what it rejected",
    )
    parser.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="NODE_ID",
        help="with --csds: only this proxy (repeatable)",
    )
    parser.add_argument(
        "--csds-ca", metavar="FILE", help="with --csds: the xDS port is TLS; its CA (PEM)"
    )
    parser.add_argument(
        "--csds-cert", metavar="FILE", help="with --csds-ca: a client certificate (mutual TLS)"
    )
    parser.add_argument("--csds-key", metavar="FILE", help="the private key of --csds-cert")
    parser.add_argument(
        "--aviator-admin",
        metavar="URL",
        help="Aviator's admin address (aviator run --admin-address), e.g. http://127.0.0.1:18001",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--cluster",
        action="append",
        default=[],
        metavar="NAMESPACE/NAME",
        help="show only this cluster (repeatable)",
    )
    parser.add_argument(
        "--all",
        action="store_true",
        dest="all_clusters",
        help="show every cluster, also those Aviator does not publish",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="per request (default 5)"
    )


def _failure(what: str, url: str, exc: Exception) -> str:
    """One line: why ``what`` at ``url`` could not be read."""
    import aiohttp

    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientConnectorError):
        code = cause.os_error.errno
        # Refused/unreachable carry a positive errno; name lookups a negative gaierror code.
        reason = os.strerror(code) if code and code > 0 else None
        reason = reason or cause.os_error.strerror or str(cause.os_error)
        return f"cannot reach {what} at {url}: {reason}"
    if isinstance(cause, TimeoutError):
        return f"{what} at {url} did not answer in time (--timeout)"
    return f"cannot read {what} at {url}: {' '.join(str(exc).split())}"


def _run_csds(args: argparse.Namespace) -> int:
    import asyncio

    from aviator.envoy.inspect import CsdsError, fetch_csds, render_csds

    address = args.csds
    if "://" in address or ":" not in address:
        raise UsageError(
            f"--csds must be HOST:PORT (the control plane's xDS address), got {address!r}"
        )
    if args.envoy_admin is not None or args.aviator_admin is not None:
        raise UsageError("--csds asks the control plane alone: no --envoy-admin or --aviator-admin")
    if (args.csds_cert is None) != (args.csds_key is None):
        raise UsageError("--csds-cert and --csds-key go together")
    if args.csds_cert is not None and args.csds_ca is None:
        raise UsageError("--csds-cert needs --csds-ca")
    try:
        nodes = asyncio.run(
            fetch_csds(
                address,
                nodes=args.node,
                timeout_s=args.timeout,
                ca_file=args.csds_ca,
                cert_file=args.csds_cert,
                key_file=args.csds_key,
            )
        )
    except CsdsError as exc:
        print(f"aviator inspect: {exc}", file=sys.stderr)
        return 1
    if args.json:
        body = {"csds": address, "nodes": [n.to_json() for n in nodes]}
        sys.stdout.write(json.dumps(body, indent=2) + "\n")
    else:
        sys.stdout.write(render_csds(nodes, source=address) + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout:g}")
    if args.csds is not None:
        return _run_csds(args)
    if args.envoy_admin is None:
        raise UsageError("give --envoy-admin URL (one Envoy) or --csds HOST:PORT (a control plane)")
    if args.node or args.csds_ca or args.csds_cert or args.csds_key:
        raise UsageError("--node and --csds-* go with --csds")
    envoy_admin = _url(args.envoy_admin, "--envoy-admin")
    aviator_admin = (
        None if args.aviator_admin is None else _url(args.aviator_admin, "--aviator-admin")
    )
    import asyncio

    from aviator.envoy.errors import EnvoyAdminError
    from aviator.envoy.inspect import AviatorAdminError, collect, render_table

    try:
        report = asyncio.run(
            collect(
                envoy_admin,
                aviator_admin,
                clusters=args.cluster,
                all_clusters=args.all_clusters,
                request_timeout_s=args.timeout,
            )
        )
    except EnvoyAdminError as exc:
        message = _failure("Envoy's admin", envoy_admin, exc)
        print(f"aviator inspect: {message}", file=sys.stderr)
        return 1
    except AviatorAdminError as exc:
        assert aviator_admin is not None
        message = _failure("Aviator's admin", aviator_admin, exc)
        print(f"aviator inspect: {message}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        sys.stdout.write(render_table(report) + "\n")
    return 0
