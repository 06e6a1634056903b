"""Issue 11, "Show": a Deployment and a policy made with kubectl, balanced by a real Envoy.

The install is ``dist/crd.yaml`` + ``dist/operator.yaml`` on the real 1.20 API server;
``aviator run --source kubernetes`` runs with the ServiceAccount's token; the gateway is a real
Envoy from ``aviator bootstrap --mode gateway`` (see :mod:`.harness`). Checked:

- pods of different latencies → at least 80% of the requests go to the fast half once the
  weights have settled (after 3 s of traffic; the share after three ping intervals is
  printed too), and no request fails;
- ``kubectl scale`` up and down, a policy edit (the traffic port) and the policy's deletion
  each reach Envoy; how long each took (from kubectl returning, or from the pod's status
  being written, to Envoy's ``/clusters`` or ``/config_dump`` showing it) is printed and held
  to a generous bound (the issue's goal is 2 s; a loaded 2-core machine may need more).
"""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.kubernetes import harness
from tests.e2e.kubernetes.harness import (
    ALT,
    FOLLOW_BOUND_S,
    SHARE_PING_INTERVAL,
    SHARE_WINDOW_S,
    WARMUP_S,
    Stack,
    fast_share,
    policy_yaml,
    took,
    until,
)

pytestmark = pytest.mark.envoy
k8s_stack = harness.k8s_stack  # the fixture, visible to this module's tests


# aviator run's default: every namespace (the shipped ClusterRole's reads).
@pytest.mark.parametrize("k8s_stack", [{"all_namespaces": True}], indirect=True, ids=["all-ns"])
async def test_a_deployment_and_a_policy_made_with_kubectl_send_the_traffic_to_the_fast_half(
    k8s_stack: Stack,
) -> None:
    s = k8s_stack
    web = s.app("web")
    await web.create(4)
    await web.make_ready(4, slow=[False, False, True, True])
    assert len(web.fast_pods()) == 2
    await s.apply_policy(policy_yaml("web", "web", ping_interval=SHARE_PING_INTERVAL))
    await s.ready_for_traffic(web, web.endpoints())

    async with s.traffic(web, rate=80) as traffic:
        start = asyncio.get_running_loop().time()
        await asyncio.sleep(WARMUP_S + SHARE_WINDOW_S)
    share = fast_share(traffic, s.pool, start + WARMUP_S, "Deployment")
    assert share >= 0.8
    assert traffic.failed() == [], traffic.failures()

    # Every namespace is watched: other tests' namespaces (still being deleted) may show too.
    mine = [v for v in await s.aviator.view("policies") if f" {s.namespace}/" in v["policy"]]
    (view,) = mine
    assert view["policy"] == f"AviatorPolicy {s.namespace}/web"  # where kubectl put it
    assert view["serving"] is True
    assert [p for p in await s.aviator.view("problems") if s.namespace in p] == []


async def test_envoy_follows_scaling_a_policy_edit_and_the_policys_deletion(
    k8s_stack: Stack,
) -> None:
    s = k8s_stack
    web = s.app("web")
    await web.create(2)
    await web.make_ready(2, slow=[False, True])
    await s.apply_policy(policy_yaml("web", "web"))
    await s.ready_for_traffic(web, web.endpoints())
    loop = asyncio.get_running_loop()
    figures: dict[str, float] = {}

    async with s.traffic(web, rate=40) as traffic:
        # Up: the new pod becomes Ready (the kubelet's status write) → Envoy holds it.
        await web.scale(3)
        ready_at = await web.make_ready(3, slow=[False])
        await s.gateway.wait_hosts(web.cluster, web.endpoints(), within=FOLLOW_BOUND_S + 10)
        figures["pod Ready → Envoy holds it"] = loop.time() - ready_at

        # Down: kubectl scale → the controller deletes two pods → Envoy lets them go.
        before = await s.gateway.hosts(web.cluster)
        scaled_at = await web.scale(1)

        async def one_left() -> frozenset[str] | None:
            held = await s.gateway.hosts(web.cluster)
            return held if len(held) == 1 and held < before else None

        await until(one_left, "Envoy down to one host", within=FOLLOW_BOUND_S + 10)
        figures["kubectl scale --replicas=1 → Envoy dropped 2 hosts"] = loop.time() - scaled_at
        await web.pods(1)
        assert await s.gateway.hosts(web.cluster) == web.endpoints()  # the pod that stayed

        # The policy edited: its traffic port moves from `http` to `alt`.
        edited_at = await s.apply_policy(policy_yaml("web", "web", port=ALT))
        await s.gateway.wait_hosts(web.cluster, web.endpoints(ALT), within=FOLLOW_BOUND_S + 10)
        figures["policy edited (port http → alt) → Envoy's hosts moved"] = loop.time() - edited_at

        # Up again, on the new port.
        await web.scale(2)
        ready_at = await web.make_ready(2, slow=[True])
        await s.gateway.wait_hosts(web.cluster, web.endpoints(ALT), within=FOLLOW_BOUND_S + 10)
        figures["pod Ready → Envoy holds it (second time)"] = loop.time() - ready_at

        # Traffic through the last state too, and enough of it to mean something however fast
        # the steps went (a CI run did all of them in under a second: 36 requests at 40/s).
        async def enough() -> bool:
            return len(traffic.records) > 40

        await until(enough, "more than 40 requests through the gateway", within=30)
    assert traffic.failed() == [], traffic.failures()

    # Deleted: the cluster leaves Envoy.
    await s.kubectl("delete", "aviatorpolicy", "web")
    deleted_at = loop.time()

    async def gone() -> bool:
        return web.cluster not in await s.gateway.clusters()

    await until(gone, "the cluster gone from Envoy", within=FOLLOW_BOUND_S + 10)
    figures["policy deleted → Envoy dropped its cluster"] = loop.time() - deleted_at
    assert await s.aviator.view("policies") == []

    for label, seconds in figures.items():
        took(label, seconds)
    slow = {k: round(v, 2) for k, v in figures.items() if v > FOLLOW_BOUND_S}
    assert not slow, f"slower than {FOLLOW_BOUND_S} s: {slow}"
