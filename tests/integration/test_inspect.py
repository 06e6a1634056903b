"""``aviator inspect`` against a real Envoy fed by a real control plane (the demo's stack)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from aviator.cli import build_parser
from aviator.cli import inspect as inspect_cli
from aviator.demo.scenario import (
    HOST_HEADER,
    WORKLOAD,
    demo_backends,
    pick_addresses,
    write_objects,
)
from aviator.demo.stack import DemoStack
from aviator.envoy.inspect import Report, collect
from aviator.envoy.process import free_port
from tests.envoy_fixtures import poll_until

pytestmark = pytest.mark.envoy


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[DemoStack]:
    backends = demo_backends(pick_addresses(3, first="127.0.0.150"), slowdown=None)
    write_objects(tmp_path / "source", backends)
    # A threshold below web-b's 40 ms: within the demo's 50 ms every pod weighs the same.
    policy = tmp_path / "source" / "policy.yaml"
    policy.write_text(
        policy.read_text().replace("latencyThreshold: 50ms", "latencyThreshold: 20ms")
    )
    async with DemoStack(
        backends,
        source_dir=tmp_path / "source",
        gateway_port=free_port(),
        envoy_dir=tmp_path / "envoy",
    ) as running:
        await running.wait_serving()
        # Traffic, so that each pod reports its own latency (10, 15, 40 ms) and the weights
        # differ (web-b above the threshold: the floor): a table of equal weights would not
        # show which side a number came from.
        async with aiohttp.ClientSession() as http:

            async def one() -> None:
                async with http.get(running.gateway_url, headers={"Host": HOST_HEADER}) as r:
                    assert r.status == 200

            for _ in range(20):
                await asyncio.gather(*(one() for _ in range(10)))

            # And a trickle while the test runs: the agent keeps 5 s of latencies, and once
            # they aged out every pod looked the same (a loaded CI machine missed the window).
            async def trickle() -> None:
                while True:
                    await one()
                    await asyncio.sleep(0.05)

            background = asyncio.create_task(trickle())
            try:
                yield running
            finally:
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await background


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aviator",
        "inspect",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def settled(stack: DemoStack, *, differing: bool = False) -> tuple[Report, dict[str, int]]:
    """An inspect report read while neither Envoy's nor Aviator's weights moved, with them;
    ``differing``: once they are not all equal (the weights start equal, before each pod's
    latency is known, and a loaded machine takes several 500 ms pings to get there)."""
    cluster = WORKLOAD.cluster_name

    async def check() -> tuple[Report, dict[str, int]] | None:
        envoy_before = {h.address: h.weight for h in await stack.envoy.admin.hosts(cluster)}
        aviator = {r["address"]: r["weight"] for r in stack.control_plane.endpoints_view()}
        report = await collect(stack.envoy.admin_url, stack.aviator_admin_url)
        envoy_after = {h.address: h.weight for h in await stack.envoy.admin.hosts(cluster)}
        still = {r["address"]: r["weight"] for r in stack.control_plane.endpoints_view()}
        steady = envoy_before == envoy_after == aviator == still
        if steady and (not differing or len(set(envoy_before.values())) > 1):
            return report, envoy_before
        return None

    return await poll_until(check, within=20, interval=0.2)


async def test_report_carries_envoys_real_weights_equal_to_aviators(stack: DemoStack) -> None:
    report, envoy_weights = await settled(stack, differing=True)
    rows = {r.address: r for r in report.rows}
    assert set(rows) == {f"{b.host}:{b.port}" for b in stack.backends}
    assert {r.cluster for r in report.rows} == {WORKLOAD.cluster_name}  # no aviator-xds
    for address, row in rows.items():
        assert row.envoy_weight == envoy_weights[address]
        assert row.aviator_weight == row.envoy_weight
        assert row.weight_match is True
        assert row.envoy_health == row.aviator_health == "HEALTHY"
        assert row.pod in {b.name for b in stack.backends}
        assert row.samples is not None
        assert row.samples > 0
    assert len(set(envoy_weights.values())) > 1, envoy_weights
    assert sum(r.rq_total or 0 for r in report.rows) >= 200  # the fixture's requests
    assert (report.compared, report.matching) == (3, 3)


async def envoy_weights(stack: DemoStack) -> dict[str, int]:
    return {h.address: h.weight for h in await stack.envoy.admin.hosts(WORKLOAD.cluster_name)}


async def cli_while_steady(stack: DemoStack, *args: str) -> tuple[str, dict[str, int]]:
    """Run ``aviator inspect ARGS`` until Envoy's weights did not move while it ran; return
    its output and those weights."""
    for _ in range(10):
        before = await envoy_weights(stack)
        code, out, err = await cli(*args)
        assert code == 0, err
        if await envoy_weights(stack) == before:
            return out, before
    raise AssertionError("Envoy's weights moved during every one of 10 runs")


async def test_cli_table_and_json(stack: DemoStack) -> None:
    await settled(stack)
    envoy, aviator = stack.envoy.admin_url, stack.aviator_admin_url

    out, weights = await cli_while_steady(
        stack, "--envoy-admin", envoy, "--aviator-admin", aviator, "--json"
    )
    doc = json.loads(out)
    assert {e["address"]: e["envoy"]["weight"] for e in doc["endpoints"]} == weights
    for e in doc["endpoints"]:
        assert e["aviator"]["weight"] == e["envoy"]["weight"]
        assert e["weight_match"] is True
    assert doc["weights"] == {"compared": 3, "equal": 3}

    out, weights = await cli_while_steady(stack, "--envoy-admin", envoy, "--aviator-admin", aviator)
    lines = out.splitlines()
    assert lines[-1] == "3 endpoints in 1 cluster; Envoy's weight equals Aviator's for 3 of 3"
    for address, weight in weights.items():
        line = next(line for line in lines if address in line)
        cells = line.split()
        assert cells[2] == str(weight)  # Envoy's weight column
        assert cells[-1] == "yes"

    code, out, err = await cli("--envoy-admin", envoy, "--all")
    assert code == 0, err
    assert "aviator-xds" in out  # the static cluster to the control plane
    assert "add --aviator-admin" in out.splitlines()[-1]


async def test_cli_one_line_errors_for_admin_urls(stack: DemoStack) -> None:
    envoy = stack.envoy.admin_url
    closed = f"http://127.0.0.1:{free_port()}"
    code, out, err = await cli("--envoy-admin", envoy, "--aviator-admin", closed)
    assert (code, out) == (1, "")
    assert err == f"aviator inspect: cannot reach Aviator's admin at {closed}: Connection refused\n"
    # Envoy's admin given as Aviator's: it answers, but not as Aviator does.
    code, out, err = await cli("--envoy-admin", envoy, "--aviator-admin", envoy)
    assert (code, out) == (1, "")
    assert err.count("\n") == 1
    assert "HTTP 404 (is this Aviator's admin address?)" in err


def test_unreachable_envoy_admin_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    # The subcommand's own run(): main() would point structlog at this test's captured stderr,
    # which is closed once the test ends.
    args = build_parser(["inspect"]).parse_args(["inspect", "--envoy-admin", closed])
    assert inspect_cli.run(args) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err
        == f"aviator inspect: cannot reach Envoy's admin at {closed}: Connection refused\n"
    )
