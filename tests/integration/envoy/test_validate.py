"""Every bootstrap Aviator prints is accepted by the real Envoy (``--mode validate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aviator.cli import main
from aviator.envoy.bootstrap import render_bootstrap
from aviator.envoy.errors import EnvoyConfigError, EnvoyNotFoundError
from aviator.envoy.process import validate
from aviator.model import WorkloadKey

pytestmark = pytest.mark.envoy

BASE: dict[str, Any] = {"xds_host": "127.0.0.1", "xds_port": 18000, "node_id": "n-1"}
WORKLOADS = [WorkloadKey("shop", "cart"), WorkloadKey("shop", "api")]

VARIANTS: dict[str, dict[str, Any]] = {
    "gateway": {},
    "gateway-delta": {"delta": True},
    "gateway-dns-xds": {"xds_host": "aviator.aviator-system.svc.cluster.local"},
    "gateway-ipv6-xds": {"xds_host": "::1"},
    "gateway-admin-0-fetch-timeout": {"admin_port": 0, "initial_fetch_timeout": 0.5},
    # Bare y/n are booleans to Envoy's YAML parser: the names must come out quoted.
    "gateway-yaml-bool-like-names": {"node_id": "n", "cluster": "Y"},
    "sidecar": {"mode": "sidecar", "workloads": WORKLOADS},
    "sidecar-no-workloads": {"mode": "sidecar"},
    "sidecar-delta-any-address": {
        "mode": "sidecar",
        "workloads": WORKLOADS[:1],
        "delta": True,
        "listen_address": "0.0.0.0",
        "listen_port": 15001,
    },
}


@pytest.mark.parametrize("name", VARIANTS)
async def test_bootstrap_variant_is_valid_without_warnings(name: str) -> None:
    warnings = await validate(render_bootstrap(**{**BASE, **VARIANTS[name]}))
    # No deprecated-field or missing-limit warnings either.
    assert warnings == ()


async def test_cli_output_is_valid(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("aviator.log.configure", lambda *args, **kwargs: None)
    code = main(
        ["bootstrap", "--xds", "[::1]:18000", "--node-id", "pod-1", "--mode", "sidecar",
         "--workload", "shop/cart"]
    )  # fmt: skip
    assert code == 0
    path = tmp_path / "bootstrap.yaml"
    path.write_text(capsys.readouterr().out)
    assert await validate(path) == ()


async def test_validate_clusters_false_is_what_lets_the_sidecar_start() -> None:
    boot = render_bootstrap(**BASE, mode="sidecar", workloads=WORKLOADS)
    (listener,) = boot["static_resources"]["listeners"]
    listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "validate_clusters"
    ] = True
    with pytest.raises(EnvoyConfigError, match="unknown cluster 'shop/"):
        await validate(boot)


async def test_rejection_carries_envoys_reason() -> None:
    boot = render_bootstrap(**BASE)
    boot["static_resources"]["clusters"][0]["connect_timeout_typo"] = "1s"
    with pytest.raises(EnvoyConfigError) as exc:
        await validate(boot)
    message = str(exc.value)
    assert message.startswith("envoy rejected the config (exit 1): ")
    assert "connect_timeout_typo" in message
    assert "[critical]" not in message  # the log prefix is stripped


async def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(EnvoyConfigError, match="no Envoy config file at"):
        await validate(tmp_path / "absent.yaml")


async def test_missing_binary(tmp_path: Path) -> None:
    with pytest.raises(EnvoyNotFoundError, match="cannot run"):
        await validate(render_bootstrap(**BASE), binary=tmp_path / "envoy")
