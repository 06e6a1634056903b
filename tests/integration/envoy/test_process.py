"""EnvoyProcess starts a real Envoy, and never leaves one behind."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import aiohttp
import pytest

from aviator.envoy.bootstrap import render_bootstrap
from aviator.envoy.errors import EnvoyNotFoundError, EnvoyStartError
from aviator.envoy.process import EnvoyProcess, free_port
from tests.envoy_fixtures import BackendFactory, loopback_bootstrap, static_cluster

pytestmark = pytest.mark.envoy


def gone(pid: int) -> bool:
    """True once no process has this pid (asyncio reaped it: not even a zombie remains)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def idle_config() -> dict[str, object]:
    return render_bootstrap(
        xds_host="127.0.0.1", xds_port=free_port(), node_id="idle", admin_port=0
    )


async def test_serves_traffic_and_is_gone_after_exit(
    http_backends: BackendFactory, tmp_path: Path
) -> None:
    backend = await http_backends("b1")
    port = free_port()
    config = loopback_bootstrap(listen_port=port, cluster=static_cluster("shop/cart", [backend]))
    async with EnvoyProcess(config, workdir=tmp_path) as envoy:
        pid = envoy.pid
        assert not gone(pid)
        assert envoy.admin_url.startswith("http://127.0.0.1:")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/hello") as response,
        ):
            assert response.status == 200
            assert await response.text() == "b1"
        assert backend.hits == 1
        assert "starting main dispatch loop" in envoy.log_text()
    assert gone(pid)
    assert envoy.returncode == 0  # SIGTERM is a clean shutdown for Envoy
    assert (tmp_path / "envoy.log").is_file()  # a given workdir is kept


async def test_stopped_when_the_body_raises() -> None:
    seen: list[tuple[int, Path]] = []

    async def body() -> None:
        async with EnvoyProcess(idle_config()) as envoy:
            seen.append((envoy.pid, envoy.log_path.parent))
            raise RuntimeError("test body failed")

    with pytest.raises(RuntimeError, match="test body failed"):
        await body()
    ((pid, workdir),) = seen
    assert gone(pid)
    assert not workdir.exists()  # a temporary workdir is removed


async def test_stopped_when_the_body_is_cancelled() -> None:
    started = asyncio.Event()
    pids: list[int] = []

    async def body() -> None:
        async with EnvoyProcess(idle_config()) as envoy:
            pids.append(envoy.pid)
            started.set()
            await asyncio.Event().wait()  # forever, until cancelled

    task = asyncio.create_task(body())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gone(pids[0])


async def test_two_envoys_at_once_need_no_base_id() -> None:
    async with EnvoyProcess(idle_config()) as one, EnvoyProcess(idle_config()) as two:
        assert one.pid != two.pid
        assert one.admin_url != two.admin_url
        assert (await one.admin.server_info()).node_id == "idle"
        assert (await two.admin.server_info()).node_id == "idle"


async def test_a_config_envoy_rejects_fails_the_start_with_its_reason(tmp_path: Path) -> None:
    config = idle_config()
    config["no_such_field"] = True
    envoy = EnvoyProcess(config, workdir=tmp_path)
    with pytest.raises(EnvoyStartError) as exc:
        await envoy.start()
    first_line = str(exc.value).splitlines()[0]
    assert first_line.startswith("envoy exited with code 1 while starting: ")
    assert "no such field: 'no_such_field'" in first_line
    assert envoy.returncode == 1


async def test_a_process_that_never_answers_is_killed(tmp_path: Path) -> None:
    # Stands in for a wedged Envoy: never writes an admin address and ignores SIGTERM.
    fake = tmp_path / "fake-envoy"
    fake.write_text("#!/bin/sh\ntrap '' TERM\nexec sleep 60\n")
    fake.chmod(0o755)
    envoy = EnvoyProcess(
        idle_config(), binary=fake, workdir=tmp_path, start_timeout=0.3, stop_timeout=0.2
    )
    with pytest.raises(
        EnvoyStartError, match=re.escape("did not answer on its admin endpoint within 0.3s")
    ):
        await envoy.start()
    assert envoy.returncode == -9  # SIGTERM was ignored: SIGKILL ended it


async def test_missing_binary(tmp_path: Path) -> None:
    envoy = EnvoyProcess(idle_config(), binary=tmp_path / "nope", workdir=tmp_path)
    with pytest.raises(EnvoyNotFoundError, match="cannot run"):
        await envoy.start()


async def test_stop_is_idempotent_and_start_only_once() -> None:
    envoy = EnvoyProcess(idle_config())
    await envoy.start()
    with pytest.raises(RuntimeError, match="already started"):
        await envoy.start()
    pid = envoy.pid
    await envoy.stop()
    await envoy.stop()
    assert gone(pid)
