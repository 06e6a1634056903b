"""Scaffolding for tests/e2e/kubernetes/test_status.py: ``aviator run --source kubernetes`` as
a user starts it, with the shipped ServiceAccount's credentials, next to real backends and a
real Envoy gateway from ``aviator bootstrap``.

- :func:`grant_operator_namespace`: the shipped leader-election Role and RoleBinding
  (``deploy/operator/rbac.yaml``, unchanged but for their namespace) in a test's own
  namespace, so each test has its own Leases (``--operator-namespace``) and a test that
  SIGKILLs a leader leaves no held lease behind for the next one.
- :class:`AviatorRun`: one ``aviator run`` process (log in a file, admin views over HTTP).
- :func:`gateway`: a real Envoy from ``aviator bootstrap`` output.
- :func:`stand_in_pod`: a Ready Pod carrying the operator Deployment's labels, standing for an
  ``aviator run`` replica (its name is the process's ``POD_NAME``): the leader finds the
  replicas' ACK reports through them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml

from aviator.envoy.process import EnvoyProcess, free_port
from aviator.testbed.kubeapi import ROOT, KubeTestEnv

T = TypeVar("T")

OPERATOR_LABELS = {
    "app.kubernetes.io/name": "aviator",
    "app.kubernetes.io/component": "control-plane",
}


def grant_operator_namespace(env: KubeTestEnv, namespace: str) -> None:
    """Apply the shipped Role/RoleBinding for Leases into ``namespace`` (same rules, same
    ServiceAccount ``aviator-system/aviator``)."""
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "operator" / "rbac.yaml").read_text()))
    namespaced = [d for d in docs if d and d["kind"] in ("Role", "RoleBinding")]
    assert {d["kind"] for d in namespaced} == {"Role", "RoleBinding"}, "rbac.yaml changed shape"
    for doc in namespaced:
        doc["metadata"]["namespace"] = namespace
    env.apply(yaml.safe_dump_all(namespaced))


def stand_in_pod(env: KubeTestEnv, namespace: str, name: str, ip: str) -> None:
    env.apply(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": OPERATOR_LABELS},
                "spec": {"containers": [{"name": "aviator", "image": "example/aviator:1"}]},
            }
        )
        + "\n"
    )
    env.set_pod_status(namespace, name, ip=ip, ready=True)


def status_of(env: KubeTestEnv, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = env.get(
        "aviatorpolicies", name, namespace=namespace, group="aviator.io", version="v1alpha1"
    )
    return obj


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}


async def eventually(
    check: Callable[[], Awaitable[T]], *, within: float, what: str, interval: float = 0.2
) -> T:
    """Poll ``check`` until it returns something truthy; fail at ``within`` with the last."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s (last: {value!r})")
        await asyncio.sleep(interval)


@dataclass
class AviatorRun:
    """One ``aviator run --source kubernetes`` process."""

    proc: asyncio.subprocess.Process
    log: Path
    xds_port: int
    admin_port: int
    identity: str

    async def view(self, name: str) -> Any:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.admin_port}/debug/{name}") as r,
        ):
            return json.loads(await r.text())

    async def ready(self) -> bool:
        assert self.proc.returncode is None, f"aviator run exited:\n{self.tail()}"
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{self.admin_port}/readyz") as r,
            ):
                return r.status == 200
        except aiohttp.ClientConnectionError:
            return False

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.asynccontextmanager
async def aviator_run(
    kubeconfig: Path,
    *,
    namespace: str,
    operator_namespace: str,
    identity: str,
    gateway_port: int,
    workdir: Path,
) -> AsyncIterator[AviatorRun]:
    """Start ``aviator run``; wait for /readyz; SIGTERM (exit 0 expected) at the end unless
    the test killed it."""
    xds, admin = free_port(), free_port()
    log = workdir / f"aviator-run-{identity}.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aviator", "--log-level", "info", "run",
            "--source", "kubernetes", "--kubeconfig", str(kubeconfig), "--namespace", namespace,
            "--operator-namespace", operator_namespace,
            "--xds-address", f"127.0.0.1:{xds}", "--admin-address", f"127.0.0.1:{admin}",
            "--gateway-address", "127.0.0.1", "--gateway-port", str(gateway_port),
            "--allow-probe-loopback",
            stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "POD_NAME": identity, "POD_NAMESPACE": "not-this-one"},
        )  # fmt: skip
    run = AviatorRun(proc, log, xds, admin, identity)
    try:
        await eventually(run.ready, within=60, what=f"aviator run {identity} ready")
        yield run
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError as exc:
                proc.kill()
                await proc.wait()
                raise AssertionError(f"aviator run did not stop:\n{run.tail()}") from exc
            assert proc.returncode == 0, run.tail()
            assert "Traceback" not in run.text(), run.tail(200)


@contextlib.asynccontextmanager
async def gateway(
    run: AviatorRun, *, node_id: str, listen_port: int, workdir: Path
) -> AsyncIterator[EnvoyProcess]:
    """A real Envoy gateway whose bootstrap ``aviator bootstrap`` printed."""
    printed = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aviator", "bootstrap", "--xds", f"127.0.0.1:{run.xds_port}",
        "--node-id", node_id, "--listen", str(listen_port), "--listen-address", "127.0.0.1",
        "--admin", str(free_port()),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(printed.communicate(), 30)
    assert printed.returncode == 0, err.decode()
    config = yaml.safe_load(out)
    async with EnvoyProcess(config, workdir=workdir / f"envoy-{node_id}") as envoy:
        await asyncio.wait_for(envoy.wait_live(), 30)
        yield envoy
