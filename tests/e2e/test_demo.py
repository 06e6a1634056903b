"""``aviator demo`` end to end: real backends, control plane, Envoy and load, as a user runs it.

Each test runs the CLI in a child process (``python -m aviator demo``) on loopback addresses
of its own and a free gateway port, then checks what it printed, its JSON summary, and that
every process it started (backends' process, Envoy) is gone.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from aviator.envoy.process import free_port

pytestmark = pytest.mark.envoy


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def start_demo(tmp_path: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aviator",
        "demo",
        "--first-address",
        "127.0.0.120",  # away from other tests' backends; busy ones are skipped anyway
        "--gateway-port",
        str(free_port()),
        "--json-summary",
        str(tmp_path / "summary.json"),
        "--workdir",
        str(tmp_path / "work"),  # kept: Envoy's log is there if a test fails
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process, within_s: float) -> tuple[int, str, str]:
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def share(doc: dict[str, Any], pod: str, phase: str) -> float:
    row = next(p for p in doc["pods"] if p["pod"] == pod)
    value = row["share"][phase]
    assert value is not None, f"{pod} answered nothing {phase} the slowdown"
    return float(value)


async def test_demo_runs_shows_traffic_leaving_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    # Something already listens on the first address's port 8080: the demo skips it.
    with socket.create_server(("127.0.0.120", 8080)):
        proc = await start_demo(tmp_path, "--duration", "15", "--rate", "150", "--interval", "1")
        code, out, err = await finish(proc, 90)
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"

    doc = json.loads((tmp_path / "summary.json").read_text())
    slowed = doc["slowdown"]["pod"]
    before, during = share(doc, slowed, "before"), share(doc, slowed, "during")
    print(f"{slowed}: {before:.0%} before, {during:.0%} during; verdict: {doc['verdict']}")
    assert during < before, doc["verdict"]
    assert doc["traffic_left"] == (during <= before / 2)
    assert not doc["interrupted"]
    assert [b["address"] for b in doc["backends"]] == [
        "127.0.0.121:8080",
        "127.0.0.122:8080",
        "127.0.0.123:8080",
    ]
    assert "skipped busy addresses" in err
    assert doc["requests"] > 0
    assert doc["ok"] + sum(doc["errors"].values()) == doc["requests"]
    assert sum(p["requests"] for p in doc["pods"]) <= doc["requests"]
    assert len(doc["frames"]) >= 10  # one per second of load, give or take the last one
    assert all(len(f["pods"]) == 3 for f in doc["frames"])
    # Envoy held Aviator's weights: by the end of the run some frame shows them equal.
    assert any(
        all(p["weight"] is not None and p["weight"] == p["envoy_weight"] for p in f["pods"])
        for f in doc["frames"]
    )

    # What the user saw: the live table, then the summary ending in the verdict.
    assert "SLOWDOWN: " in out
    assert "summary: " in out
    assert out.rstrip().splitlines()[-1] == doc["verdict"]
    assert sorted(p.name for p in (tmp_path / "work" / "source").iterdir()) == [
        "deployment.yaml",
        "pods.yaml",
        "policy.yaml",
    ]
    assert set(doc["processes"]) == {"backends", "envoy"}
    for name, pid in doc["processes"].items():
        assert not alive(pid), f"{name} (pid {pid}) outlived the demo"


async def test_ctrl_c_ends_the_run_with_a_summary_and_stops_everything(tmp_path: Path) -> None:
    proc = await start_demo(tmp_path, "--duration", "60", "--rate", "50", "--interval", "1")
    assert proc.stdout is not None
    seen = []
    async with asyncio.timeout(60):
        while True:  # wait for the first frame of the live table: the load is running
            line = (await proc.stdout.readline()).decode()
            assert line, "the demo ended before drawing a frame"
            seen.append(line)
            if line.startswith("t="):
                break
    proc.send_signal(signal.SIGINT)
    code, out, err = await finish(proc, 30)
    assert code == 130, f"exit {code}\nstdout:\n{''.join(seen)}{out}\nstderr:\n{err}"
    assert "summary (interrupted):" in out

    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["interrupted"]
    assert doc["ran_s"] < 60
    assert set(doc["processes"]) == {"backends", "envoy"}
    for name, pid in doc["processes"].items():
        assert not alive(pid), f"{name} (pid {pid}) outlived the demo"
