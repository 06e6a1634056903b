"""``ControlPlane.run``: a task that ends on its own stops the control plane with an error
naming the task; :meth:`ControlPlane.stop` is the only clean way out."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from aviator.controlplane import ControlPlane, ControlPlaneError, Settings, TaskEndedError
from aviator.source.store import StateSource, Store


class EndingSource:
    """A state source whose ``run`` returns after its first publish (or raises)."""

    name = "test:ending"

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    async def run(self, store: Store) -> None:
        await asyncio.sleep(0)
        if self.error is not None:
            raise self.error


class ForeverSource:
    name = "test:forever"

    async def run(self, store: Store) -> None:
        await asyncio.Event().wait()


def _control_plane(source: StateSource) -> ControlPlane:
    settings = Settings(source="test:", xds_address="127.0.0.1:0", admin_address="127.0.0.1:0")
    return ControlPlane(settings, source=source)


async def test_a_source_that_returns_stops_the_control_plane_with_an_error() -> None:
    control_plane = _control_plane(EndingSource())
    with pytest.raises(TaskEndedError, match="'source' ended on its own") as caught:
        await asyncio.wait_for(control_plane.run(), 10)
    assert isinstance(caught.value, ControlPlaneError)
    assert caught.value.task == "source"
    # Everything was shut down: the servers are gone.
    assert control_plane.admin.port is not None
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", control_plane.admin.port)


async def test_a_source_that_raises_names_the_task_and_the_error() -> None:
    control_plane = _control_plane(EndingSource(RuntimeError("disk on fire")))
    with pytest.raises(ControlPlaneError, match="'source' failed: RuntimeError: disk on fire"):
        await asyncio.wait_for(control_plane.run(), 10)


async def test_stop_is_a_clean_exit() -> None:
    control_plane = _control_plane(ForeverSource())
    started = asyncio.Event()
    task = asyncio.create_task(control_plane.run(started=started))
    await asyncio.wait_for(started.wait(), 10)
    control_plane.stop()
    await asyncio.wait_for(task, 10)  # returns: no error


POLICY_AND_POD = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]}
status: {phase: Running, podIP: "::1", conditions: [{type: Ready, status: "True"}]}
---
apiVersion: aviator.io/v1alpha1
kind: AviatorPolicy
metadata: {name: web, namespace: shop}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  latencyThreshold: 100ms
  pingInterval: 1s
"""


async def test_debug_endpoints_prints_an_ipv6_endpoint_in_brackets(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(POLICY_AND_POD)
    settings = Settings(
        source=f"dir:{tmp_path}", xds_address="127.0.0.1:0", admin_address="127.0.0.1:0"
    )
    control_plane = ControlPlane(settings)
    started = asyncio.Event()
    task = asyncio.create_task(control_plane.run(started=started))
    try:
        await asyncio.wait_for(started.wait(), 10)
        url = f"http://127.0.0.1:{control_plane.admin_port}/debug/endpoints"
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                async with http.get(url) as r:
                    endpoints = await r.json()
                if endpoints:
                    break
                await asyncio.sleep(0.05)
    finally:
        control_plane.stop()
        await asyncio.wait_for(task, 10)
    assert [e["address"] for e in endpoints] == ["[::1]:8080"]
