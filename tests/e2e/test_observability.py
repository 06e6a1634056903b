"""``aviator --log-json run`` as an operator runs it, with things going wrong: every line of
stderr is one JSON object (Aviator's own, the standard library's, errors), lines about a
policy or an endpoint carry ``policy`` and ``endpoint``, and ``/metrics`` counts the problems,
the failing probes and the process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from aviator.envoy.process import free_port
from tests.admin_ready import wait_ready

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "web"
PODS = {"127.0.0.11:8080", "127.0.0.12:8080", "127.0.0.13:8080"}  # nothing listens there

BAD_POLICY = """\
apiVersion: aviator.io/v1alpha1
kind: AviatorPolicy
metadata: {name: broken, namespace: shop}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  pingInterval: soon
"""


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line of ``text`` as a JSON object; fails naming the first that is not."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            pytest.fail(f"stderr line {number} is not JSON: {line[:300]!r}")
        assert isinstance(value, dict), line
        assert {"event", "level", "timestamp"} <= value.keys(), line
        out.append(value)
    return out


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text (None if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = (
        "^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)$"
    )
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else None


async def _scrape(http: aiohttp.ClientSession, admin: int) -> str:
    async with http.get(f"http://127.0.0.1:{admin}/metrics") as response:
        return await response.text()


async def _until(
    http: aiohttp.ClientSession, admin: int, check: Callable[[str], bool], within_s: float = 60
) -> str:
    """Scrape until ``check(text)``; fail with the last scrape after ``within_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        text = await _scrape(http, admin)
        if check(text):
            return text
        if loop.time() > deadline:
            pytest.fail(f"metrics never got there; last scrape:\n{text[-3000:]}")
        await asyncio.sleep(0.2)


async def test_json_logs_and_metrics_while_things_go_wrong(tmp_path: Path) -> None:
    source = tmp_path / "web"
    shutil.copytree(EXAMPLES, source)
    admin = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aviator", "--log-json", "run", "--source", f"dir:{source}",
        "--xds-address", f"127.0.0.1:{free_port()}", "--admin-address", f"127.0.0.1:{admin}",
        "--allow-probe-loopback", "--endpoint-weight-metrics", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    reader = asyncio.create_task(proc.stderr.read())  # read all along: a full pipe blocks it
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, admin, within_s=30)
            # Probes fail (no backend at the pods' addresses): counted and timed.
            await _until(
                http,
                admin,
                lambda t: (
                    (metric(t, "aviator_probe_failing_endpoints") or 0) == len(PODS)
                    and (
                        metric(t, "aviator_probe_duration_seconds_count", outcome="connect_error")
                        or 0
                    )
                    >= len(PODS)
                ),
            )
            # A policy that does not validate, and a file that does not parse.
            (source / "broken.yaml").write_text(BAD_POLICY)
            (source / "garbage.yaml").write_text("kind: [unclosed\n")
            text = await _until(
                http,
                admin,
                lambda t: (
                    metric(t, "aviator_problems", kind="policy_invalid") == 1
                    and metric(t, "aviator_problems", kind="file") == 1
                ),
            )
            # A request the admin server cannot parse: the client's error, one line.
            _, writer = await asyncio.open_connection("127.0.0.1", admin)
            writer.write(b"\x16\x03\x01 not http\r\n\r\n")
            await writer.drain()
            writer.close()
            await _until(http, admin, lambda t: True)  # the admin server is still answering
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        err = (await asyncio.wait_for(reader, 10)).decode()
    assert code == 0, err[-3000:]
    lines = json_lines(err)

    # Lines about an endpoint name it, its pod and its policy.
    failing = [ln for ln in lines if ln["event"] == "probe target failing"]
    assert {ln["endpoint"] for ln in failing} == PODS
    assert {ln["policy"] for ln in failing} == {"AviatorPolicy shop/web"}
    assert all(ln["pod"].startswith("web-") and ln["workload"] == "shop/web" for ln in failing)
    # The invalid policy is logged with its name; the broken file with its path.
    invalid = [ln for ln in lines if ln.get("policy") == "AviatorPolicy shop/broken"]
    assert invalid, "no log line names the invalid policy"
    assert any("pingInterval" in json.dumps(ln) for ln in invalid)
    assert any(
        ln["event"] == "k8s.dirsource.problem" and ln["file"].endswith("garbage.yaml")
        for ln in lines
    )
    assert any(ln["event"] == "admin: bad request" for ln in lines)
    assert not any("Traceback" in json.dumps(ln) for ln in lines)
    assert lines[-1]["event"] == "control plane stopped"

    # Metrics: bounded labels, process metrics, the opt-in weights capped at 2 of 3.
    assert (metric(text, "process_resident_memory_bytes") or 0) > 0
    assert metric(text, "process_open_fds") is not None
    weights = re.findall(r"^aviator_endpoint_weight\{(.*)\} (\S+)$", text, re.MULTILINE)
    assert len(weights) == 2, weights
    assert all('workload="shop/web"' in labels for labels, _ in weights)
    assert metric(text, "aviator_endpoint_weight_series_dropped") == 1
    assert metric(text, "aviator_problems", kind="probe_refused") == 0
    assert metric(text, "aviator_snapshot_build_seconds_count") is not None
    # Nothing else carries an address or a pod name as a label.
    for line in text.splitlines():
        if line.startswith(("#", "aviator_endpoint_weight{")):
            continue
        assert "127.0.0." not in line, line
        assert "web-7d4b9c" not in line, line


async def test_a_usage_error_is_a_json_line_too() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aviator", "--log-json", "run", "--source", "nowhere",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    (line,) = json_lines(err.decode())
    assert line["level"] == "error"
    assert "--source must be dir:PATH" in line["error"]
