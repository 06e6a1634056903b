"""The fleet process: starts, serves, changes phases, and never leaves a process behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest
from aviator_agent.orca import ORCA_HEADER, parse_orca_header

from aviator.testbed.backend import BACKEND_HEADER, BackendSpec
from aviator.testbed.fleet import Fleet, FleetError
from aviator.testbed.fleetserver import FleetSpec
from aviator.testbed.loadgen import run_load_process
from aviator.testbed.loadspec import LoadSpec, plan
from aviator.testbed.profile import Phase, Profile


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _wait_gone(pid: int, within_s: float = 15.0) -> bool:
    for _ in range(int(within_s / 0.05)):
        if not _alive(pid):
            return True
        await asyncio.sleep(0.05)
    return not _alive(pid)


def _spec(**kwargs: object) -> FleetSpec:
    return FleetSpec(
        backends=(
            BackendSpec("a", Profile.constant(0.001, 4), seed=1),
            BackendSpec("b", Profile.constant(0.001, 4), host="127.0.0.2", seed=2),
        ),
        agent=False,
        **kwargs,  # type: ignore[arg-type]
    )


async def _status(session: aiohttp.ClientSession, url: str) -> tuple[int, str | None]:
    async with session.get(url) as resp:
        await resp.read()
        return resp.status, resp.headers.get(BACKEND_HEADER)


async def test_fleet_serves_changes_phases_and_stops() -> None:
    async with Fleet(_spec()) as fleet, aiohttp.ClientSession() as session:
        pid = fleet.pid
        assert _alive(pid)
        urls = fleet.backend_urls
        assert urls["b"].startswith("http://127.0.0.2:")
        assert [await _status(session, urls[n]) for n in ("a", "b")] == [(200, "a"), (200, "b")]

        await fleet.set_phases([Phase(0.0, error_rate=1.0)], backend="a")
        assert await _status(session, urls["a"]) == (503, "a")
        assert await _status(session, urls["b"]) == (200, "b")

        stats = await fleet.stats()
        assert stats["a"].failed_fast == 1
        assert stats["a"].served == 1
        assert stats["a"].phase.error_rate == 1.0
        assert stats["b"].served == 2

        await fleet.set_phases(Profile.constant(0.001, 2))  # every backend
        await fleet.restart_clock()
        stats = await fleet.stats()
        assert {s.phase.capacity for s in stats.values()} == {2}
        with pytest.raises(FleetError, match="no backend named"):
            await fleet.set_phases([Phase(0.0)], backend="nope")
    assert not _alive(pid)


async def test_fleet_stops_when_the_block_raises() -> None:
    pids: list[int] = []

    async def use_and_fail() -> None:
        async with Fleet(_spec()) as fleet:
            pids.append(fleet.pid)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await use_and_fail()
    assert len(pids) == 1
    assert not _alive(pids[0])


async def test_fleet_that_cannot_bind_fails_and_leaves_nothing() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fleet = Fleet(FleetSpec(backends=(BackendSpec("x", port=port),), agent=False))
        with pytest.raises(FleetError, match="exited with code"):
            await fleet.start()
    with pytest.raises(RuntimeError, match="not started"):
        _ = fleet.pid


async def test_fleet_dies_with_its_parent(tmp_path: Path) -> None:
    # A parent that starts a fleet, reports the fleet's pid, then is killed with SIGKILL (no
    # cleanup runs): the fleet sees its stdin close and stops by itself.
    spec_json = json.dumps(json.dumps(_spec().to_json()))
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, json, sys
            from aviator.testbed.fleetserver import FleetSpec
            from aviator.testbed.fleet import Fleet

            async def main():
                fleet = Fleet(FleetSpec.from_json(json.loads({spec_json})))
                await fleet.start()
                print("FLEETPID", fleet.pid, flush=True)
                await asyncio.sleep(3600)

            asyncio.run(main())
            """
        )
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdout=asyncio.subprocess.PIPE
    )
    child_pid = None
    try:
        assert parent.stdout is not None
        async with asyncio.timeout(30):
            while not (line := await parent.stdout.readline()).startswith(b"FLEETPID"):
                assert line, "the parent exited before it reported the fleet's pid"
        child_pid = int(line.split()[1])
        assert _alive(child_pid)
        parent.send_signal(signal.SIGKILL)
        await parent.wait()
        assert await _wait_gone(child_pid)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        if child_pid is not None and _alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


async def test_fleet_stops_on_sigterm() -> None:
    fleet = Fleet(_spec())
    await fleet.start()
    pid = fleet.pid
    try:
        os.kill(pid, signal.SIGTERM)
        assert await _wait_gone(pid)
    finally:
        await fleet.stop()
    assert not _alive(pid)


async def test_load_generator_process_against_the_fleet() -> None:
    async with Fleet(_spec()) as fleet:
        spec = LoadSpec(tuple(fleet.backend_urls.values()), duration_s=1.0, rate=100.0, seed=2)
        times, targets = plan(spec)
        result = await run_load_process(spec)
        stats = await fleet.stats()
    assert result.spec == spec
    assert result.measured == len(times)
    assert result.ok + sum(result.errors.values()) == len(times)
    assert stats["a"].received == targets.count(0)
    assert stats["b"].received == targets.count(1)
    assert sum(result.by_backend.values()) == len(times)


async def test_fleet_backends_report_load_with_the_agent() -> None:
    spec = FleetSpec(backends=(BackendSpec("r", Profile.constant(0.001, 3)),))
    assert spec.agent
    async with Fleet(spec) as fleet, aiohttp.ClientSession() as session:
        url = fleet.backend_urls["r"]
        async with session.get(url + "/work") as resp:
            assert resp.status == 200
            assert parse_orca_header(resp.headers[ORCA_HEADER]).rif is not None
        async with session.get(url + spec.probe_path) as resp:
            body = await resp.json()
        assert body["rif"] == 0
        assert body["capacity"] == 3
        assert (await fleet.stats())["r"].received == 1
