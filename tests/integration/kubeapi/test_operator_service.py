"""The hot-avoiding Service (spec.publishService) kept by aviator.operator.HotAvoidingServices,
on the real API server, as the operator's ServiceAccount with deploy/overlays/service applied.

Weights come from the real weigher (operator_support.weights_for) fed with latencies the
test chooses: a pod is "slowed" by giving it 300 ms against a 100 ms threshold.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from aviator.k8s.resolve import PolicyResolution
from aviator.model import WorkloadKey
from aviator.operator.kube import KubeApi
from aviator.operator.service_writer import HotAvoidingServices
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

ON = "  publishService: true"
NET = "10.1.0"  # pod IPs: the API server refuses loopback addresses in Endpoints


@pytest.fixture
def service_rbac(aviator_install: AviatorInstall) -> Iterator[None]:
    env = aviator_install.env
    env.apply(ROOT / "deploy" / "overlays" / "service")
    yield
    env.kubectl("delete", "clusterrolebinding,clusterrole", "aviator-services",
                "--ignore-not-found")  # fmt: skip


@pytest.fixture
async def api(aviator_install: AviatorInstall, service_rbac: None) -> AsyncIterator[KubeApi]:
    async with kube_api(aviator_install.kubeconfig) as api:
        yield api


@contextlib.asynccontextmanager
async def running(services: HotAvoidingServices) -> AsyncIterator[HotAvoidingServices]:
    task = asyncio.create_task(services.run())
    try:
        yield services
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def get_or_none(env: KubeTestEnv, resource: str, name: str, ns: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = env.get(resource, name, namespace=ns)
    except KubeTestEnvError as exc:
        if exc.status == 404:
            return None
        raise
    return obj


def listed_pods(endpoints: dict[str, Any] | None) -> set[str]:
    if endpoints is None:
        return set()
    return {a["targetRef"]["name"] for s in endpoints.get("subsets") or [] for a in s["addresses"]}


async def endpoints_are(env: KubeTestEnv, ns: str, want: set[str], what: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        ep = await asyncio.to_thread(get_or_none, env, "endpoints", "web-aviator", ns)
        return ep if ep is not None and listed_pods(ep) == want else None

    return await eventually(check, what=what)


def loop_now() -> float:
    return asyncio.get_running_loop().time()


class Fleet:
    """A policy's resolution and the weigher's successive results as latencies change."""

    def __init__(self, services: HotAvoidingServices, res: tuple[PolicyResolution, ...]) -> None:
        self.services = services
        self.res = res
        (self.r,) = res
        assert self.r.key is not None
        self.key: WorkloadKey = self.r.key
        self.weights: WeighResult | None = None

    def latencies(self, latency_ms: dict[str, float]) -> WeighResult:
        self.weights = weights_for(self.r, latency_ms, previous=self.weights)
        self.services.update(self.res, {self.key: self.weights}, loop_now())
        return self.weights


async def test_the_slowed_pod_leaves_the_endpoints_and_comes_back_after_it_recovers(
    kube_env: KubeTestEnv, kube_namespace: str, api: KubeApi
) -> None:
    ns = kube_namespace
    await asyncio.to_thread(kube_env.apply, deployment("web", ns, replicas=4))
    pods = await asyncio.to_thread(ready_pods, kube_env, ns, "web", 4, net=NET)
    names = {p["metadata"]["name"] for p in pods}
    slow = pods[2]["metadata"]["name"]
    await asyncio.to_thread(kube_env.apply, policy("web", ns, target="web", extra=ON))
    services = HotAvoidingServices(api, per_service=0.5)
    async with running(services):
        fleet = Fleet(services, await resolutions(kube_env, ns))
        fleet.latencies({})
        ep = await endpoints_are(kube_env, ns, names, "all four pods listed")

        svc = kube_env.get("services", "web-aviator", namespace=ns)
        assert "selector" not in svc["spec"]
        assert svc["spec"]["ports"] == [
            {"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP"}
        ]
        (owner,) = svc["metadata"]["ownerReferences"]
        avp = kube_env.get("aviatorpolicies", "web", namespace=ns, group="aviator.io",
                           version="v1alpha1")  # fmt: skip
        assert (owner["kind"], owner["name"], owner["uid"]) == (
            "AviatorPolicy", "web", avp["metadata"]["uid"],
        )  # fmt: skip
        assert ep["subsets"][0]["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]

        # Slowed: it leaves.
        hot = fleet.latencies({slow: 300.0})
        assert len(hot.hot) == 1
        await endpoints_are(kube_env, ns, names - {slow}, "the slowed pod left out")
        # Recovered: still out for the rejoin delay (3 ping intervals), then back, with no
        # new input (the writer's own timer).
        fleet.latencies({})
        recovered = loop_now()
        await asyncio.sleep(1.5)
        ep_now = await asyncio.to_thread(get_or_none, kube_env, "endpoints", "web-aviator", ns)
        assert listed_pods(ep_now) == names - {slow}
        await endpoints_are(kube_env, ns, names, "the recovered pod back")
        assert loop_now() - recovered >= 3.0

        # The API server's EndpointSliceMirroring controller turned the Endpoints into a
        # slice (discovery.k8s.io/v1beta1 on 1.20): clients that read slices see the same.
        async def mirrored() -> set[str] | None:
            slices = await asyncio.to_thread(
                kube_env.request, "GET",
                f"/apis/discovery.k8s.io/v1beta1/namespaces/{ns}/endpointslices"
                "?labelSelector=kubernetes.io/service-name%3Dweb-aviator",
            )  # fmt: skip
            got = {e["targetRef"]["name"] for s in slices["items"] for e in s["endpoints"]}
            return got if got == names else None

        await eventually(mirrored, what="the EndpointSlice mirrored")


async def test_all_hot_lists_all_and_a_hot_set_over_the_cap_lists_all(
    kube_env: KubeTestEnv, kube_namespace: str, api: KubeApi
) -> None:
    ns = kube_namespace
    await asyncio.to_thread(kube_env.apply, deployment("web", ns, replicas=4))
    pods = await asyncio.to_thread(ready_pods, kube_env, ns, "web", 4, net=NET)
    names = {p["metadata"]["name"] for p in pods}
    await asyncio.to_thread(kube_env.apply, policy("web", ns, target="web", extra=ON))
    services = HotAvoidingServices(api, per_service=0.5)
    async with running(services):
        fleet = Fleet(services, await resolutions(kube_env, ns))
        every = fleet.latencies(dict.fromkeys(names, 300.0))
        assert every.hot == frozenset()  # the weigher: overloaded as a whole
        await endpoints_are(kube_env, ns, names, "all listed when all are hot")
        # A hot set bigger than the weigher's cap (1 of 4) is not believed: all listed.
        two = frozenset(e.address for e in fleet.r.endpoints[:2])
        forged = WeighResult(every.endpoints, hot=two)
        services.update(fleet.res, {fleet.key: forged}, loop_now())
        await asyncio.sleep(1.0)
        await endpoints_are(kube_env, ns, names, "still all listed")


async def test_the_service_goes_with_the_policy_or_the_option_and_a_foreign_one_is_left_alone(
    kube_env: KubeTestEnv, kube_namespace: str, api: KubeApi
) -> None:
    ns = kube_namespace
    await asyncio.to_thread(kube_env.apply, deployment("web", ns, replicas=2))
    await asyncio.to_thread(ready_pods, kube_env, ns, "web", 2, net=NET)
    await asyncio.to_thread(kube_env.apply, deployment("shop", ns, replicas=1))
    await asyncio.to_thread(ready_pods, kube_env, ns, "shop", 1, first_ip=31, net=NET)
    await asyncio.to_thread(kube_env.apply, policy("web", ns, target="web", extra=ON))
    await asyncio.to_thread(kube_env.apply, policy("shop", ns, target="shop", extra=ON))
    # The user already has a Service called shop-aviator: Aviator must not touch it.
    await asyncio.to_thread(
        kube_env.kubectl, "create", "service", "clusterip", "shop-aviator", "--tcp=80:8080",
        "-n", ns,
    )  # fmt: skip
    foreign = kube_env.get("services", "shop-aviator", namespace=ns)
    services = HotAvoidingServices(api, per_service=0.5)

    async def web_service() -> tuple[Any, Any]:
        svc = await asyncio.to_thread(get_or_none, kube_env, "services", "web-aviator", ns)
        ep = await asyncio.to_thread(get_or_none, kube_env, "endpoints", "web-aviator", ns)
        return svc, ep

    async def present() -> bool:
        svc, ep = await web_service()
        return svc is not None and ep is not None

    async def gone() -> bool:
        return await web_service() == (None, None)

    async with running(services):
        services.update(await resolutions(kube_env, ns), {}, loop_now())
        await eventually(present, what="web-aviator created")
        await asyncio.sleep(1.0)  # shop-aviator had its chance to be overwritten
        foreign_now = kube_env.get("services", "shop-aviator", namespace=ns)
        assert foreign_now == foreign
        assert services.reconciler.failures >= 1  # it was refused, and said so

        # The option turned off: gone. On again: back.
        await asyncio.to_thread(kubectl_patch, kube_env, "avp", "web", ns,
                                {"spec": {"publishService": False}})  # fmt: skip
        services.update(await resolutions(kube_env, ns), {}, loop_now())
        await eventually(gone, what="web-aviator gone with the option")
        await asyncio.to_thread(kubectl_patch, kube_env, "avp", "web", ns,
                                {"spec": {"publishService": True}})  # fmt: skip
        services.update(await resolutions(kube_env, ns), {}, loop_now())
        await eventually(present, what="web-aviator back")

        # The policy deleted: Aviator deletes the Service and its Endpoints (not waiting
        # for the garbage collector, which would do it through the ownerReference).
        kube_env.kubectl("delete", "avp", "web", "-n", ns)
        services.update(await resolutions(kube_env, ns), {}, loop_now())
        await eventually(gone, what="web-aviator gone with the policy")
    assert kube_env.get("services", "shop-aviator", namespace=ns) == foreign
