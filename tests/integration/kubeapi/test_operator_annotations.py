"""Pod annotations (spec.annotatePods) written by aviator.operator.PodAnnotator, on the real
API server, as the operator's ServiceAccount with deploy/overlays/annotations applied.

What 1.20 cannot show: its ReplicaSet controller does not read
controller.kubernetes.io/pod-deletion-cost (1.22, or 1.21 with the PodDeletionCost feature
gate), so "a scale-down deletes the slowest pod first" needs a newer cluster; here the test
shows the costs that such a controller would act on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from aviator.k8s.resolve import PolicyResolution
from aviator.model import EndpointAddress, WorkloadKey
from aviator.operator.annotations import (
    DELETION_COST_ANNOTATION,
    LATENCY_ANNOTATION,
    MANAGED_LABEL,
    WEIGHT_ANNOTATION,
)
from aviator.operator.annotator import PodAnnotator
from aviator.operator.kube import KubeApi
from aviator.probing.weigher import WeighResult
from aviator.testbed.kubeapi import ROOT, KubeTestEnv, KubeTestEnvError
from tests.kubeapi.fixtures import AviatorInstall

from .operator_support import (
    deployment,
    eventually,
    kube_api,
    kubectl_patch,
    policy,
    ready_pods,
    resolutions,
    weights_for,
)

OURS = (WEIGHT_ANNOTATION, LATENCY_ANNOTATION, DELETION_COST_ANNOTATION)


@pytest.fixture
def annotation_rbac(aviator_install: AviatorInstall) -> Iterator[None]:
    """deploy/overlays/annotations applied; its extra grant removed afterwards."""
    env = aviator_install.env
    env.apply(ROOT / "deploy" / "overlays" / "annotations")
    yield
    env.kubectl("delete", "clusterrolebinding,clusterrole", "aviator-annotate-pods",
                "--ignore-not-found")  # fmt: skip


@pytest.fixture
async def api(aviator_install: AviatorInstall) -> AsyncIterator[KubeApi]:
    async with kube_api(aviator_install.kubeconfig) as api:
        yield api


@contextlib.asynccontextmanager
async def running(annotator: PodAnnotator) -> AsyncIterator[PodAnnotator]:
    task = asyncio.create_task(annotator.run())
    try:
        yield annotator
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def pods_by_name(env: KubeTestEnv, ns: str) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in env.get("pods", namespace=ns)["items"]}


def ours(pod: dict[str, Any]) -> dict[str, str]:
    annotations = pod["metadata"].get("annotations") or {}
    return {k: v for k, v in annotations.items() if k in OURS}


class Feed:
    """What the control plane hands the annotator: resolutions, weights, latencies."""

    def __init__(self, annotator: PodAnnotator) -> None:
        self.annotator = annotator
        self.latency: dict[EndpointAddress, float] = {}

    def push(self, res: tuple[PolicyResolution, ...], weights: dict[WorkloadKey, WeighResult],
             latency_ms: dict[str, float]) -> None:  # fmt: skip
        self.latency = {
            e.address: latency_ms.get(e.pod, 5.0) / 1000 for r in res for e in r.endpoints
        }
        self.annotator.update(
            res, weights, lambda _key, address: self.latency.get(address),
            asyncio.get_running_loop().time(),
        )  # fmt: skip


async def test_the_slow_pod_gets_the_lowest_deletion_cost_and_annotations_go_when_turned_off(
    kube_env: KubeTestEnv, kube_namespace: str, api: KubeApi, annotation_rbac: None
) -> None:
    ns = kube_namespace
    await asyncio.to_thread(kube_env.apply, deployment("web", ns, replicas=3))
    pods = await asyncio.to_thread(ready_pods, kube_env, ns, "web", 3)
    slow = pods[1]["metadata"]["name"]
    await asyncio.to_thread(kube_env.apply, policy("web", ns, target="web",
                                                    extra="  annotatePods: true"))  # fmt: skip
    key = WorkloadKey(ns, "web")
    annotator = PodAnnotator(api, per_pod=1.0)
    feed = Feed(annotator)
    async with running(annotator):
        res = await resolutions(kube_env, ns)
        (r,) = res
        latencies = {slow: 300.0}
        w = weights_for(r, latencies)
        feed.push(res, {key: w}, latencies)

        async def annotated() -> dict[str, dict[str, Any]] | None:
            now = await asyncio.to_thread(pods_by_name, kube_env, ns)
            return now if all(len(ours(p)) == 3 for p in now.values()) else None

        by_name = await eventually(annotated, what="every pod annotated")
        cost = {n: int(ours(p)[DELETION_COST_ANNOTATION]) for n, p in by_name.items()}
        assert min(cost, key=lambda n: cost[n]) == slow
        assert len({cost[n] for n in cost if n != slow}) == 1  # the fast ones tie
        assert cost[slow] < min(c for n, c in cost.items() if n != slow)
        assert ours(by_name[slow])[LATENCY_ANNOTATION] == "300"
        for n, p in by_name.items():
            address = next(e.address for e in r.endpoints if e.pod == n)
            assert ours(p)[WEIGHT_ANNOTATION] == str(w.endpoints[address].weight)
            assert p["metadata"]["labels"][MANAGED_LABEL] == "true"
            assert p["metadata"]["labels"]["app"] == "web"  # the rest untouched

        # Steady state, and latency noise (up to +-40 %, a 1.5x swing): no writes.
        writes = api.writes
        for jitter in (1.0, 1.1, 0.95, 1.2, 1.4, 0.6):
            noisy = {slow: 300.0 * jitter}
            feed.push(res, {key: weights_for(r, noisy, previous=w)}, noisy)
            await asyncio.sleep(0.5)
        assert api.writes == writes

        # Turned off: every annotation and the label go.
        await asyncio.to_thread(kubectl_patch, kube_env, "avp", "web", ns,
                                {"spec": {"annotatePods": False}})  # fmt: skip
        res = await resolutions(kube_env, ns)
        feed.push(res, {key: w}, latencies)

        async def cleared() -> bool:
            now = await asyncio.to_thread(pods_by_name, kube_env, ns)
            return all(
                not ours(p) and MANAGED_LABEL not in p["metadata"].get("labels", {})
                for p in now.values()
            )

        await eventually(cleared, what="annotations removed")
        assert api.writes == writes + 3


async def test_a_new_leader_removes_what_no_policy_wants_and_deleted_policies_lose_theirs(
    kube_env: KubeTestEnv, kube_namespace: str, api: KubeApi, annotation_rbac: None
) -> None:
    ns = kube_namespace
    await asyncio.to_thread(kube_env.apply, deployment("web", ns, replicas=2))
    pods = await asyncio.to_thread(ready_pods, kube_env, ns, "web", 2)
    # A pod annotated by an earlier leader for a policy that is gone.
    left = pods[0]["metadata"]["name"]
    await asyncio.to_thread(kubectl_patch, kube_env, "pod", left, ns, {"metadata": {
        "labels": {MANAGED_LABEL: "true"},
        "annotations": {WEIGHT_ANNOTATION: "7", DELETION_COST_ANNOTATION: "7"},
    }})  # fmt: skip

    class Gate:
        leading = False

        def is_leader(self) -> bool:
            return self.leading

    gate = Gate()
    annotator = PodAnnotator(api, gate=gate, per_pod=1.0)
    async with running(annotator):
        annotator.update(await resolutions(kube_env, ns), {}, lambda _k, _a: None, 0.0)
        await asyncio.sleep(0.5)
        assert api.writes == 0  # a follower cleans nothing up
        gate.leading = True
        annotator.leadership(True)

        async def clean() -> bool:
            return not ours((await asyncio.to_thread(pods_by_name, kube_env, ns))[left])

        await eventually(clean, what="the stale annotations removed")
        assert api.writes == 1


async def test_without_the_overlay_the_operator_may_not_annotate(
    kube_env: KubeTestEnv, kube_namespace: str, aviator_install: AviatorInstall
) -> None:
    ns = kube_namespace
    await asyncio.to_thread(kube_env.apply, deployment("web", ns, replicas=1))
    await asyncio.to_thread(ready_pods, kube_env, ns, "web", 1)
    result = kube_env.kubectl(
        "auth", "can-i", "patch", "pods", "-n", ns, kubeconfig=aviator_install.kubeconfig,
        check=False,
    )  # fmt: skip
    assert result.stdout.strip() == "no"
    # And the schema refuses a non-boolean opt-in, on the real server.
    with pytest.raises(KubeTestEnvError, match="annotatePods"):
        kube_env.apply(policy("web", ns, target="web", extra='  annotatePods: "yes"'))
