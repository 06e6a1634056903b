"""Programmed counts the proxies of every replica: per-replica ACK reports in Leases, read by
the leader (aviator.operator.AckReports), on the real API server as the operator's
ServiceAccount. The replicas' Pods are stand-ins created in aviator-system (nothing runs
images here), made Ready as a kubelet would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aviator.operator.acks import ClusterAcks
from aviator.operator.reports import REPORT_ANNOTATION, AckReports, report_lease_name
from aviator.operator.status_writer import StatusWriter
from aviator.testbed.kubeapi import KubeTestEnv, KubeTestEnvError
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


@contextlib.asynccontextmanager
async def running(*parts: Any) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(p.run()) for p in parts]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


def lease_or_none(env: KubeTestEnv, name: str) -> dict[str, Any] | None:
    try:
        lease: dict[str, Any] = env.get("leases", name, namespace=NS, group="coordination.k8s.io")
    except KubeTestEnvError as exc:
        if exc.status == 404:
            return None
        raise
    return lease


async def test_the_leader_counts_every_replicas_proxies(
    aviator_install: AviatorInstall,
    kube_env: KubeTestEnv,
    kube_namespace: str,
    replica_pods: tuple[str, str, str],  # noqa: F811 - the fixture
) -> None:
    leader_id, peer_id, selector = replica_pods
    ns = kube_namespace
    cluster = f"{ns}/web"
    await asyncio.to_thread(kube_env.apply, deployment("web", ns, replicas=2))
    await asyncio.to_thread(ready_pods, kube_env, ns, "web", 2)
    await asyncio.to_thread(kube_env.apply, policy("web", ns, target="web"))
    kc = aviator_install.kubeconfig
    async with kube_api(kc) as leader_api, kube_api(kc) as peer_api:
        changes: list[int] = []
        leader = AckReports(leader_api, namespace=NS, identity=leader_id, pod_selector=selector,
                            poll_interval=0.2, min_interval=0.2,
                            on_change=lambda: changes.append(1))  # fmt: skip
        peer = AckReports(peer_api, namespace=NS, identity=peer_id, pod_selector=selector,
                          min_interval=0.2, poll_interval=3600)  # fmt: skip
        local = {cluster: ClusterAcks(3, 3)}
        assert leader.merged(local) is None  # peers not read yet: no status from half a view
        async with running(leader, peer):
            peer.publish({cluster: ClusterAcks(2, 1, 1, ("envoy: bad endpoint weight",))})

            async def counted() -> dict[str, ClusterAcks] | None:
                merged = leader.merged(local)
                return merged if merged and merged[cluster].proxies == 5 else None

            merged = await eventually(counted, what="the peer's proxies counted")
            assert merged[cluster] == ClusterAcks(5, 4, 1, ("envoy: bad endpoint weight",))
            assert changes

            # The whole chain: the status says Rejected with the peer's Envoy's message.
            writer = StatusWriter(leader_api, settle=0.0)
            async with running(writer):
                writer.update(await resolutions(kube_env, ns), merged)

                async def rejected() -> str | None:
                    obj = await asyncio.to_thread(
                        kube_env.get, "aviatorpolicies", "web", namespace=ns,
                        group="aviator.io", version="v1alpha1",
                    )  # fmt: skip
                    c = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
                    p = c.get("Programmed", {})
                    return p.get("message") if p.get("reason") == "Rejected" else None

                message = await eventually(rejected, what="Programmed Rejected")
            assert "1 of 5 proxies rejected" in message
            assert "envoy: bad endpoint weight" in message

            # Steady state: the same counts published again write nothing.
            writes = peer_api.writes
            for _ in range(50):
                peer.publish({cluster: ClusterAcks(2, 1, 1, ("envoy: bad endpoint weight",))})
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)
            assert peer_api.writes == writes

            # The report Lease belongs to its replica's Pod.
            lease = lease_or_none(kube_env, report_lease_name(peer_id))
            assert lease is not None
            assert REPORT_ANNOTATION in lease["metadata"]["annotations"]
            (owner,) = lease["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["name"]) == ("Pod", peer_id)

            # A replica whose Pod is not Ready is not counted (its proxies reconnect to
            # another replica and are counted there).
            await asyncio.to_thread(kube_env.set_pod_status, NS, peer_id, ready=False)

            async def uncounted() -> bool:
                m = leader.merged(local)
                return m is not None and m[cluster] == ClusterAcks(3, 3)

            await eventually(uncounted, what="the NotReady replica left out")

        # The Pod deleted: the garbage collector deletes its report.
        kube_env.kubectl("delete", "pod", peer_id, "-n", NS, "--wait=false")

        async def collected() -> bool:
            return (
                await asyncio.to_thread(lease_or_none, kube_env, report_lease_name(peer_id)) is None
            )

        await eventually(collected, within=60, what="the report Lease garbage-collected")
