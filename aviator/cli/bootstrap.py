"""``aviator bootstrap``: print an Envoy bootstrap (YAML) for a gateway or a sidecar."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from aviator.cli.usage import UsageError
from aviator.envoy.bootstrap import XdsTls, bootstrap_yaml, render_bootstrap
from aviator.model import WorkloadKey, parse_host_port

# Prints the bootstrap on stdout and logs nothing: the CLI sets up no logging for it (and
# so never imports structlog); tests/test_cli.py checks that it stays so.
LOGS = False


def parse_workload(text: str) -> WorkloadKey:
    """``NAMESPACE/NAME`` → WorkloadKey; raises ``ValueError`` naming the text otherwise."""
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise ValueError(f"expected NAMESPACE/NAME, got {text!r}")
    return WorkloadKey(namespace, name)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {text!r}")
    return int(text)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--xds", required=True, metavar="HOST:PORT", help="address of Aviator's ADS (gRPC) port"
    )
    parser.add_argument("--node-id", required=True, metavar="ID", help="this Envoy's node id")
    parser.add_argument(
        "--node-cluster", default="aviator", metavar="NAME", help="node.cluster (default aviator)"
    )
    parser.add_argument("--mode", choices=("gateway", "sidecar"), default="gateway")
    parser.add_argument(
        "--listen",
        type=_port,
        metavar="PORT",
        help="traffic port. Gateway: the port of the listener the control plane sends it over "
        "LDS (default: aviator run's --gateway-port, 10000 unless told). Sidecar: its listener's "
        "port (default 10000)",
    )
    parser.add_argument(
        "--listen-address",
        metavar="IP",
        help="traffic address. Gateway: where the listener the control plane sends binds "
        "(default: aviator run's --gateway-address, 0.0.0.0 = every interface unless told). "
        "Sidecar: its listener's address (default 127.0.0.1)",
    )
    parser.add_argument(
        "--admin", type=_port, default=9901, metavar="PORT", help="admin port on 127.0.0.1"
    )
    parser.add_argument(
        "--workload",
        action="append",
        default=[],
        metavar="NAMESPACE/NAME",
        help="sidecar: route Host <name>.<namespace>[.svc[.cluster.local]] to this workload "
        "(repeatable)",
    )
    parser.add_argument(
        "--delta", action="store_true", help="use incremental (delta) ADS instead of SotW"
    )
    tls = parser.add_argument_group(
        "xDS over TLS", "match aviator run --xds-tls-cert/--xds-tls-key/--xds-tls-client-ca"
    )
    tls.add_argument(
        "--xds-tls-ca",
        metavar="FILE",
        help="reach the control plane over TLS, trusting the CA in FILE (as Envoy sees it)",
    )
    tls.add_argument(
        "--xds-tls-cert", metavar="FILE", help="mutual TLS: this proxy's certificate chain"
    )
    tls.add_argument("--xds-tls-key", metavar="FILE", help="mutual TLS: this proxy's private key")
    tls.add_argument(
        "--xds-tls-server-name",
        metavar="NAME",
        help="SNI sent, and a subject alternative name the server's certificate must carry "
        "(default: the chain alone is checked)",
    )


def _check_names(args: argparse.Namespace) -> None:
    """What render_bootstrap would reject, reported with the flag's name."""
    for flag, value in (("--node-id", args.node_id), ("--node-cluster", args.node_cluster)):
        if not value.strip():
            raise UsageError(f"{flag} must not be empty")


def run(args: argparse.Namespace) -> int:
    try:
        host, port = parse_host_port(args.xds)
    except ValueError as exc:
        raise UsageError(f"--xds: {exc}") from exc
    _check_names(args)
    try:
        workloads = [parse_workload(w) for w in args.workload]
    except ValueError as exc:
        raise UsageError(f"--workload: {exc}") from exc
    if args.listen_address is not None and not _is_ip(args.listen_address):
        raise UsageError(
            "--listen-address must be an IP address such as 0.0.0.0, 127.0.0.1 or ::, "
            f"got {args.listen_address!r}"
        )
    tls = None
    tls_extra = args.xds_tls_cert or args.xds_tls_key or args.xds_tls_server_name
    if tls_extra and not args.xds_tls_ca:
        raise UsageError(
            "--xds-tls-cert, --xds-tls-key and --xds-tls-server-name need --xds-tls-ca"
        )
    if args.xds_tls_ca:
        try:
            tls = XdsTls(
                ca_file=args.xds_tls_ca,
                cert_file=args.xds_tls_cert,
                key_file=args.xds_tls_key,
                server_name=args.xds_tls_server_name,
            )
        except ValueError as exc:
            raise UsageError(f"--xds-tls-*: {exc}") from exc
    if workloads and args.mode != "sidecar":
        raise UsageError("--workload needs --mode sidecar (a gateway gets its routes over ADS)")
    try:
        bootstrap = render_bootstrap(
            xds_host=host,
            xds_port=port,
            node_id=args.node_id,
            mode=args.mode,
            listen_port=args.listen,
            listen_address=args.listen_address,
            admin_port=args.admin,
            cluster=args.node_cluster,
            workloads=workloads,
            delta=args.delta,
            xds_tls=tls,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    sys.stdout.write(bootstrap_yaml(bootstrap))
    return 0
