"""``aviator run``: the control plane as a long-running process."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress

from aviator.cli.usage import UsageError
from aviator.controlplane import (
    DEFAULT_ADMIN_ADDRESS,
    DEFAULT_XDS_ADDRESS,
    ControlPlane,
    ControlPlaneError,
    Settings,
    run_until_signalled,
)
from aviator.source.yamlfiles import DEFAULT_LIMITS, Limits, parse_byte_size
from aviator.xds.resources import GatewayConfig


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source", required=True, help="where policies and pods come from: dir:PATH"
    )
    parser.add_argument("--xds-address", default=DEFAULT_XDS_ADDRESS, metavar="HOST:PORT")
    parser.add_argument("--admin-address", default=DEFAULT_ADMIN_ADDRESS, metavar="HOST:PORT")
    parser.add_argument(
        "--gateway-port",
        type=int,
        default=10000,
        help="port of the gateway listener sent over LDS (0: no listener, sidecars only)",
    )
    parser.add_argument(
        "--gateway-address",
        default=GatewayConfig().address,
        metavar="IP",
        help="address the gateway listener binds (default: every interface)",
    )
    parser.add_argument(
        "--max-file-size",
        default=f"{DEFAULT_LIMITS.max_file_bytes // 1024 // 1024}Mi",
        metavar="SIZE",
        help="dir source: a manifest file larger than this (10Mi, 500K, bytes) is not read and "
        "keeps its last good objects, with a problem (default: %(default)s)",
    )


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
            xds_address=args.xds_address,
            admin_address=args.admin_address,
            gateway=gateway,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        control_plane = ControlPlane(settings)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        asyncio.run(run_until_signalled(control_plane))
    except ControlPlaneError as exc:
        raise UsageError(str(exc)) from exc
    return 0
