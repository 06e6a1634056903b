"""Two replicas through the Operator façade on the real API server: one leader writes; the
leader dies (no release) → the other leads within the lease duration and the status keeps
being right, counting the proxies of every live replica; the follower never writes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from aviator.operator.acks import ClusterAcks
from aviator.operator.election import ElectionTiming
from aviator.operator.kube import KubeApi
from aviator.operator.runtime import Operator, OperatorSettings
from aviator.testbed.kubeapi import KubeTestEnv
from tests.kubeapi.fixtures import AviatorInstall

from .operator_support import (
    REPLICA_NS,
    deployment,
    eventually,
    kube_api,
    policy,
    ready_pods,
    replica_pods,  # noqa: F401 - a fixture
    resolutions,
)

NS = REPLICA_NS

FAST = ElectionTiming(lease_duration=2.0, renew_deadline=1.5, retry_period=0.25)


@contextlib.asynccontextmanager
async def replica(kubeconfig: Any, identity: str, selector: str, lease: str) -> AsyncIterator[
    tuple[Operator, KubeApi, asyncio.Task[None]]
]:  # fmt: skip
    async with kube_api(kubeconfig, field_manager=f"aviator-{identity}") as api:
        settings = OperatorSettings(
            namespace=NS, identity=identity, lease_name=lease, timing=FAST,
            pod_selector=selector, status_settle=0.0, report_interval=0.2,
            release_on_stop=False,
        )  # fmt: skip
        op = Operator(api, settings)
        task = asyncio.create_task(op.run())
        try:
            yield op, api, task
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def programmed(env: KubeTestEnv, ns: str) -> tuple[str, str, set[str]]:
    obj = env.get("aviatorpolicies", "web", namespace=ns, group="aviator.io", version="v1alpha1")
    c = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
    p = c.get("Programmed", {})
    managers = {m["manager"] for m in obj["metadata"].get("managedFields", [])
                if m.get("manager", "").startswith("aviator-")}  # fmt: skip
    return p.get("reason", ""), p.get("message", ""), managers


async def test_failover_keeps_the_status_right_and_only_the_leader_writes(
    aviator_install: AviatorInstall,
    kube_env: KubeTestEnv,
    kube_namespace: str,
    replica_pods: tuple[str, str, str],  # noqa: F811 - the fixture
) -> None:
    first, second, selector = replica_pods
    ns = kube_namespace
    cluster = f"{ns}/web"
    await asyncio.to_thread(kube_env.apply, deployment("web", ns, replicas=2))
    await asyncio.to_thread(ready_pods, kube_env, ns, "web", 2)
    await asyncio.to_thread(kube_env.apply, policy("web", ns, target="web"))
    res = await resolutions(kube_env, ns)
    kc = aviator_install.kubeconfig
    lease = f"ha-{ns}"[:63]
    async with replica(kc, first, selector, lease) as (a, _, task_a):
        await eventually(lambda: _leads(a), what="the first replica leading")
        async with replica(kc, second, selector, lease) as (b, api_b, _):
            for op in (a, b):
                op.state_changed(res)
            a.acks_changed({cluster: ClusterAcks(2, 2)})
            b.acks_changed({cluster: ClusterAcks(3, 3)})

            async def is_programmed() -> tuple[str, str, set[str]] | None:
                got = await asyncio.to_thread(programmed, kube_env, ns)
                return got if got[0] == "Programmed" else None

            _, _, managers = await eventually(is_programmed, what="Programmed True")
            assert managers == {f"aviator-{first}"}
            # b's proxies count too: one of them now rejects the endpoints.
            b.acks_changed({cluster: ClusterAcks(3, 2, 1, ("envoy says no",))})

            async def rejected() -> tuple[str, str, set[str]] | None:
                got = await asyncio.to_thread(programmed, kube_env, ns)
                return got if got[0] == "Rejected" else None

            _, message, _ = await eventually(rejected, what="Rejected from the follower's proxy")
            assert "1 of 5 proxies rejected" in message
            # The follower wrote its own report Lease (a create, maybe an update), nothing else.
            assert api_b.requests["POST"] == 1
            assert api_b.requests["PUT"] == 1
            assert api_b.requests["PATCH"] == api_b.requests["DELETE"] == 0

            # The leader dies without releasing: its Pod turns NotReady as a kubelet would
            # report it, its lease expires, the other takes over.
            task_a.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task_a
            killed = time.monotonic()
            await asyncio.to_thread(kube_env.set_pod_status, NS, first, ready=False)
            await eventually(lambda: _leads(b), within=10, what="the survivor leading")
            took = time.monotonic() - killed
            assert took < FAST.lease_duration + 2 * FAST.retry_period + 0.5

            # The survivor's own view: its proxies all hold the endpoints now; the dead
            # replica's report is not counted.
            b.acks_changed({cluster: ClusterAcks(4, 4)})
            _, _, managers = await eventually(is_programmed, what="Programmed True again")
            assert f"aviator-{second}" in managers
            view = b.view()
            assert view["leading"] is True
            assert view["peers"] == []


async def _leads(op: Operator) -> bool:
    return op.elector.is_leader()
