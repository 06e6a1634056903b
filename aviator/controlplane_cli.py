"""``aviator run``: the control plane as a long-running process."""

from __future__ import annotations

import argparse
import asyncio

from aviator.cli import UsageError
from aviator.controlplane import (
    DEFAULT_ADMIN_ADDRESS,
    DEFAULT_XDS_ADDRESS,
    ControlPlane,
    ControlPlaneError,
    Settings,
    run_until_signalled,
)
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


def settings_from(args: argparse.Namespace) -> Settings:
    try:
        gateway = GatewayConfig(port=args.gateway_port) if args.gateway_port else None
        return Settings(
            source=args.source,
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
