"""Reading a directory off the event loop: the worker process, a real control plane that keeps
answering while big and hostile files are read, and a SIGTERM in the middle of a parse.

Timing here is structural, with generous bounds (the figures are in ``aviator bench source``):
the loop's own lag while files are read stays under a second where parsing on the loop
froze it for the whole parse (5,000 pods: about 8 s on the machine these were written on).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from aviator.controlplane import ControlPlane, Settings
from aviator.envoy.process import free_port
from aviator.source.directory import DirectorySource
from aviator.source.store import Store

POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: web-{i}
  namespace: shop
  labels: {{app: web, topology.kubernetes.io/zone: zone-{z}}}
spec:
  containers:
  - name: main
    ports: [{{name: http, containerPort: 8080}}]
status:
  phase: Running
  podIP: 10.{a}.{b}.{c}
  conditions: [{{type: Ready, status: "True"}}]
"""

BOMB = (
    "apiVersion: v1\nkind: Pod\nmetadata: {name: bomb, namespace: shop}\nx:\n"
    '  l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(f"  l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]\n" for i in range(1, 8))
    + "spec: {containers: [{name: main, args: *l7}]}\n"
)


def pods_text(n: int, first: int = 0) -> str:
    return "---\n".join(
        POD.format(i=i, z=i % 3, a=1 + i // 65536, b=(i // 256) % 256, c=i % 256)
        for i in range(first, first + n)
    )


async def poll(check: Callable[[], bool], within: float) -> bool:
    """Whether ``check()`` came true within ``within`` seconds (polled every 20 ms)."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def eventually(check: Callable[[], bool], within: float, what: str) -> None:
    if not await poll(check, within):
        pytest.fail(f"not {what} after {within} s")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_the_source_parses_in_its_worker_and_follows_edits(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(pods_text(2))
    (tmp_path / "b.yaml").write_text(pods_text(1, first=2))
    source = DirectorySource(tmp_path, interval=0.05)
    store = Store()
    task = asyncio.create_task(source.run(store))
    try:
        await eventually(lambda: store.synced, 60, "synced")
        worker = source.worker
        assert worker is not None
        pid = worker.pid
        assert pid is not None
        assert pid != os.getpid()
        assert worker.parses == source.parse_count == 2
        assert [p.meta.name for p in store.current.pods] == ["web-0", "web-1", "web-2"]
        (tmp_path / "b.yaml").write_text(pods_text(2, first=2))
        await eventually(lambda: len(store.current.pods) == 4, 10, "edited")
        assert worker.parses == 3  # only b.yaml again
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await eventually(lambda: not alive(pid), 10, "worker gone")


async def _lag_monitor(lags: list[float], period: float = 0.01) -> None:
    """Appends how late each tick of ``period`` came: the event loop's own lag."""
    loop = asyncio.get_running_loop()
    last = loop.time()
    while True:
        await asyncio.sleep(period)
        now = loop.time()
        lags.append(now - last - period)
        last = now


async def test_admin_keeps_answering_while_big_and_hostile_files_are_read(
    tmp_path: Path,
) -> None:
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "pods.yaml").write_text(pods_text(5_000))
    (root / "bomb.yaml").write_text(BOMB)
    big = root / "big.yaml"
    big.write_text("# " + "x" * (12 * 1024 * 1024) + "\n")
    control_plane = ControlPlane(
        Settings(
            source=f"dir:{root}",
            xds_address="127.0.0.1:0",
            admin_address="127.0.0.1:0",
            gateway=None,
        )
    )
    lags: list[float] = []
    monitor = asyncio.create_task(_lag_monitor(lags))
    started = asyncio.Event()
    task = asyncio.create_task(control_plane.run(started=started))
    answers_before_sync = 0
    try:
        await started.wait()
        url = f"http://127.0.0.1:{control_plane.admin_port}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            deadline = time.monotonic() + 180
            while not control_plane.store.synced:
                assert time.monotonic() < deadline, "the directory was never read"
                async with http.get(f"{url}/healthz") as r:
                    assert r.status == 200
                answers_before_sync += 1
                await asyncio.sleep(0.02)
            async with http.get(f"{url}/debug/problems") as r:
                problems = await r.json()
    finally:
        control_plane.stop()
        await task
        monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await monitor
    assert len(control_plane.store.current.pods) == 5_000
    where = [p.split(": ", 1)[0] for p in problems]
    assert where == [str(root / "big.yaml"), f"{root / 'bomb.yaml'}:1"]
    assert "file too large to read" in problems[0]
    assert "YAML aliases expand too far" in problems[1]
    # The admin port answered while the pods were being parsed (on the loop, it could not),
    # and the loop itself was never held for long.
    assert answers_before_sync >= 3
    assert max(lags) < 1.0, f"the event loop stalled for {max(lags):.2f} s"


async def test_sigterm_during_a_parse_stops_at_once(tmp_path: Path) -> None:
    root = tmp_path / "manifests"
    root.mkdir()
    # Just under the 10 MiB limit: several seconds of parsing, even in the worker.
    (root / "pods.yaml").write_text(pods_text(32_000))
    assert (root / "pods.yaml").stat().st_size < 10 * 1024 * 1024
    admin = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aviator", "run", "--source", f"dir:{root}",
        "--xds-address", f"127.0.0.1:{free_port()}", "--admin-address", f"127.0.0.1:{admin}",
        "--gateway-port", "0",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    stderr = b""
    try:
        while b"control plane started" not in stderr:
            line = await asyncio.wait_for(proc.stderr.readline(), 60)
            assert line, f"aviator run exited: {stderr.decode()[-2000:]}"
            stderr += line
        # (Not a precondition: parsing on the loop has no worker, and must fail below.)
        await poll(lambda: bool(_workers(proc.pid)), 30)
        # And the prober's process past its exec (a child just forked still shows our
        # command line), so that it is recognised below.
        await poll(lambda: bool(_probers(_children(proc.pid))), 10)
        children, workers = _children(proc.pid), _workers(proc.pid)
        probers = _probers(children)
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(_read_all(proc), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, (stderr + rest).decode()[-2000:]
    assert b"control plane stopped" in rest
    # Stopped without finishing the parse: no state was ever built.
    assert b"k8s.dirsource.state" not in stderr + rest
    assert workers, "no parse worker was running"
    # Nothing else was started, but for the prober's own process (aviator run probes there).
    assert set(children) - set(workers) <= set(probers)
    await eventually(lambda: not any(map(alive, children)), 10, "worker gone")


async def _read_all(proc: asyncio.subprocess.Process) -> bytes:
    assert proc.stderr is not None
    out = await proc.stderr.read()
    await proc.wait()
    return out


def _workers(pid: int) -> list[int]:
    return _running(_children(pid), b"aviator.source.worker")


def _probers(pids: list[int]) -> list[int]:
    return _running(pids, b"aviator.probing.process")


def _running(pids: list[int], module: bytes) -> list[int]:
    """Those of ``pids`` whose command line names ``module``."""
    out = []
    for pid in pids:
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if module in f.read():
                out.append(pid)
    return out


def _children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(c) for c in f.read().split())
    return out
