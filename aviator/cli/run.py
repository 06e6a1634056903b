"""``aviator run``: the control plane as a long-running process."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import math
import sys

from aviator.cli.usage import UsageError
from aviator.controlplane import (
    DEFAULT_ADMIN_ADDRESS,
    DEFAULT_XDS_ADDRESS,
    SWITCH_INTERVAL_S,
    ControlPlane,
    ControlPlaneError,
    Settings,
    TaskEndedError,
    run_until_signalled,
)
from aviator.model import parse_host_port
from aviator.probing.prober import DEFAULT_MAX_PROBE_RATE
from aviator.source.yamlfiles import DEFAULT_LIMITS, Limits, parse_byte_size
from aviator.xds.resources import GatewayConfig


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        required=True,
        help="where policies and pods come from: dir:PATH, or kubernetes (the API server)",
    )
    parser.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="with --source kubernetes: credentials from this kubeconfig file "
        "(default: the pod's ServiceAccount, in-cluster)",
    )
    parser.add_argument(
        "--context",
        metavar="NAME",
        help="with --kubeconfig: the context to use (default: its current-context)",
    )
    parser.add_argument(
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NS",
        help="with --source kubernetes: watch only this namespace (repeatable; "
        "default: every namespace)",
    )
    parser.add_argument(
        "--operator-namespace",
        metavar="NS",
        help="with --source kubernetes: the namespace of the Leases that elect the replica "
        "writing status, Events, annotations and Services, and of the replicas' ACK reports "
        "(default: $POD_NAMESPACE, else aviator-system)",
    )
    parser.add_argument(
        "--xds-address",
        default=DEFAULT_XDS_ADDRESS,
        metavar="HOST:PORT",
        help="where the ADS (gRPC) server listens for Envoys; port 0 picks a free one "
        "(default %(default)s: this machine only)",
    )
    parser.add_argument(
        "--admin-address",
        default=DEFAULT_ADMIN_ADDRESS,
        metavar="HOST:PORT",
        help="where the admin HTTP server listens: /healthz, /readyz, /metrics, /debug/... "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--gateway-port",
        type=_listen_port,
        default=GatewayConfig().port,
        metavar="PORT",
        help="port of the gateway listener sent over LDS to gateways whose bootstrap names "
        "none (aviator bootstrap --listen names one per gateway); 0: no gateway listeners, "
        "sidecars only (default %(default)s)",
    )
    parser.add_argument(
        "--gateway-address",
        default=GatewayConfig().address,
        metavar="IP",
        help="address gateway listeners bind when the gateway's bootstrap names none "
        "(aviator bootstrap --listen-address) (default %(default)s: every interface)",
    )
    parser.add_argument(
        "--xds-tls-cert",
        metavar="FILE",
        help="serve xDS over TLS with this certificate chain (PEM; re-read when it changes)",
    )
    parser.add_argument("--xds-tls-key", metavar="FILE", help="the private key of --xds-tls-cert")
    parser.add_argument(
        "--xds-tls-client-ca",
        metavar="FILE",
        help="mutual TLS: refuse proxies without a certificate signed by this CA (PEM)",
    )
    parser.add_argument(
        "--xds-allow-node",
        action="append",
        default=[],
        metavar="NODE_ID",
        help="serve only proxies with this node id (repeatable; default: any)",
    )
    parser.add_argument(
        "--no-debug-views",
        dest="debug_views",
        action="store_false",
        help="serve no /debug/* views on the admin address (they show pod addresses, node "
        "ids and policy specs); /healthz, /readyz and /metrics stay",
    )
    parser.add_argument(
        "--no-freeze-heap",
        dest="freeze_heap",
        action="store_false",
        help="leave Python's garbage collector as it is; by default what survives a collection "
        "is frozen every second, so a large state (10,000 pods) is not walked in full every "
        "few seconds (pauses of 0.3 s)",
    )
    parser.add_argument(
        "--probe-in",
        choices=("process", "thread", "loop"),
        default="process",
        help="where probes run: a process of their own (the default: a probe's round trip "
        "carries no lag of the xDS fan-out, not even of this interpreter), a thread and event "
        "loop of their own, or the event loop that serves xDS",
    )
    parser.add_argument(
        "--probe-on-loop",
        dest="probe_in",
        action="store_const",
        const="loop",
        help="the same as --probe-in loop",
    )
    parser.add_argument(
        "--allow-probe-loopback",
        action="store_true",
        help="probe pods whose address is loopback (127.0.0.0/8, ::1, 0.0.0.0): pods on this "
        "machine, as in the demo and the examples; refused by default, so that a pod's "
        "address cannot make the control plane call its own host",
    )
    parser.add_argument(
        "--allow-probe-link-local",
        action="store_true",
        help="probe pods whose address is link-local (169.254.0.0/16, fe80::/10); the cloud "
        "metadata address 169.254.169.254 is never probed",
    )
    parser.add_argument(
        "--endpoint-weight-metrics",
        type=int,
        default=0,
        metavar="N",
        help="export each endpoint's weight on /metrics (aviator_endpoint_weight, labelled "
        "with workload and address) for at most N endpoints; 0: not exported (default), "
        "as addresses make a series per pod",
    )
    parser.add_argument(
        "--max-probe-rate",
        type=_probe_rate,
        default=DEFAULT_MAX_PROBE_RATE,
        metavar="PER_SECOND",
        help="probes per second for all pods together; when the policies' pingIntervals ask "
        "for more, every interval is stretched by one factor (each pod keeps its share; the "
        "aviator_probe_interval_stretch metric shows the factor). One core sustains ~5,000 "
        "probes/s; the default keeps probing near a quarter of one (default %(default)g)",
    )
    parser.add_argument(
        "--max-file-size",
        default=f"{DEFAULT_LIMITS.max_file_bytes // 1024 // 1024}Mi",
        metavar="SIZE",
        help="dir source: a manifest file larger than this (10Mi, 500K, bytes) is not read and "
        "keeps its last good objects, with a problem (default: %(default)s)",
    )


def _probe_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise argparse.ArgumentTypeError(f"must be a number of probes per second > 0, got {text!r}")
    return rate


def _listen_port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) < 65536:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {text!r}")
    return int(text)


def _address(text: str, flag: str) -> str:
    """``text`` if it is a HOST:PORT to listen on; :class:`UsageError` naming ``flag``."""
    try:
        parse_host_port(text, any_port=True)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from exc
    return text


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def settings_from(args: argparse.Namespace) -> Settings:
    try:
        if not _is_ip(args.gateway_address):  # Envoy would reject the listener
            raise ValueError(f"--gateway-address must be an IP, got {args.gateway_address!r}")
        gateway = (
            GatewayConfig(address=args.gateway_address, port=args.gateway_port)
            if args.gateway_port
            else None
        )
        try:
            max_file_bytes = parse_byte_size(args.max_file_size)
        except ValueError as exc:
            raise ValueError(f"--max-file-size: {exc}") from exc
        return Settings(
            source=args.source,
            source_limits=Limits(max_file_bytes=max_file_bytes),
            xds_address=_address(args.xds_address, "--xds-address"),
            admin_address=_address(args.admin_address, "--admin-address"),
            gateway=gateway,
            kubeconfig=args.kubeconfig,
            context=args.context,
            namespaces=tuple(args.namespaces or ()),
            operator_namespace=args.operator_namespace,
            allow_probe_loopback=args.allow_probe_loopback,
            allow_probe_link_local=args.allow_probe_link_local,
            max_probe_rate=args.max_probe_rate,
            debug_views=args.debug_views,
            freeze_heap=args.freeze_heap,
            probe_in=args.probe_in,
            xds_tls_cert=args.xds_tls_cert,
            xds_tls_key=args.xds_tls_key,
            xds_tls_client_ca=args.xds_tls_client_ca,
            xds_allowed_nodes=tuple(args.xds_allow_node),
            endpoint_weight_metrics=args.endpoint_weight_metrics,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    # The weighing pass runs in a worker thread; the loop must get the interpreter back fast.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        control_plane = ControlPlane(settings)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        asyncio.run(run_until_signalled(control_plane))
    except TaskEndedError:
        return 1  # logged in one line by the control plane; a supervisor restarts us
    except ControlPlaneError as exc:
        raise UsageError(str(exc)) from exc
    return 0
