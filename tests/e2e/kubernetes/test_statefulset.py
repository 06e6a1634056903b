"""Issue 11, "Show": a StatefulSet through a real Envoy gateway, and pods that are not ready.

The chain of :mod:`.harness` (the real API server and controller-manager, ``aviator run
--source kubernetes``, a real Envoy, testbed backends). A StatefulSet's pods come one at a
time (OrderedReady: ``db-1`` only once ``db-0`` is Running and Ready), are named by ordinal,
and go highest ordinal first on scale-down. Checked:

- a StatefulSet and a policy made with kubectl → at least 80% of the requests go to the fast
  half once the weights have settled; scaled down and up, Envoy follows; the policy
  deleted, its cluster leaves Envoy;
- a pod that turns NotReady leaves Envoy, and comes back when Ready again;
- a pod Running and Ready but without an IP yet is no endpoint and is never probed (its
  backend counts the probes it gets: none), until its IP is set.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.kubernetes import harness
from tests.e2e.kubernetes.harness import (
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


async def test_a_statefulset_sends_the_traffic_to_the_fast_half_and_envoy_follows_it(
    k8s_stack: Stack,
) -> None:
    s = k8s_stack
    db = s.app("db", "StatefulSet")
    await db.create(4)
    await db.make_ready(4, slow=[False, False, True, True])  # db-0, db-1 fast; db-2, db-3 slow
    assert db.fast_pods() == {"db-0", "db-1"}
    policy = policy_yaml("db", "db", kind="StatefulSet", ping_interval=SHARE_PING_INTERVAL)
    await s.apply_policy(policy)
    await s.ready_for_traffic(db, db.endpoints())
    loop = asyncio.get_running_loop()

    async with s.traffic(db, rate=80) as traffic:
        start = loop.time()
        await asyncio.sleep(WARMUP_S + SHARE_WINDOW_S)

        scaled_at = await db.scale(3)  # db-3 goes
        await db.pods(3)
        await s.gateway.wait_hosts(db.cluster, db.endpoints(), within=FOLLOW_BOUND_S + 10)
        down = loop.time() - scaled_at
        assert "db-3" not in db.addresses

        await db.scale(4)
        ready_at = await db.make_ready(4, slow=[True])  # db-3 again, on a slow address
        await s.gateway.wait_hosts(db.cluster, db.endpoints(), within=FOLLOW_BOUND_S + 10)
        up = loop.time() - ready_at
    assert fast_share(traffic, s.pool, start + WARMUP_S, "StatefulSet") >= 0.8
    assert traffic.failed() == [], traffic.failures()

    await s.kubectl("delete", "aviatorpolicy", "db")
    deleted_at = loop.time()

    async def gone() -> bool:
        return db.cluster not in await s.gateway.clusters()

    await until(gone, "the cluster gone from Envoy", within=FOLLOW_BOUND_S + 10)
    deleted = loop.time() - deleted_at
    took("StatefulSet: kubectl scale --replicas=3 → Envoy dropped db-3", down)
    took("StatefulSet: db-3 Ready → Envoy holds it", up)
    took("StatefulSet: policy deleted → Envoy dropped its cluster", deleted)
    assert max(down, up, deleted) <= FOLLOW_BOUND_S


@pytest.mark.parametrize("k8s_stack", [{"count_probes": True}], indirect=True, ids=["counted"])
async def test_a_pod_without_an_ip_is_not_probed_and_a_not_ready_pod_leaves_envoy(
    k8s_stack: Stack,
) -> None:
    s = k8s_stack
    db = s.app("db", "StatefulSet")
    await db.create(1)
    await db.make_ready(1, slow=[False])
    await s.apply_policy(
        policy_yaml("db", "db", kind="StatefulSet", ping_interval=SHARE_PING_INTERVAL)
    )
    await s.ready_for_traffic(db, db.endpoints())
    first = s.pool.by_ip(db.addresses["db-0"])

    # db-1: Running and Ready as far as its status says, but no IP reported yet. The address
    # it will get is serving already, and counts the probes it receives.
    await db.scale(2)
    await db.pods(2)
    await db.set_ready("db-1", ip=None)
    address = s.pool.take(slow=False)

    async def db_1_seen() -> bool:
        (view,) = await s.aviator.view("policies")
        return "db-1" in view["notReady"]

    await until(db_1_seen, "db-1 in /debug/policies as not ready")
    probes_at_start = first.probes

    async def probed_a_while() -> bool:  # five ping intervals of db-0's probes, polled
        return first.probes >= probes_at_start + 5

    await until(probed_a_while, "db-0 probed five more times")
    assert address.probes == 0, "a pod without an IP was probed"
    endpoints = await s.aviator.view("endpoints")
    assert [e["pod"] for e in endpoints] == ["db-0"]
    assert await s.gateway.hosts(db.cluster) == db.endpoints()

    # Its IP arrives: now it is an endpoint, probed, and in Envoy.
    await db.set_ready("db-1", ip=address.ip)
    db.addresses["db-1"] = address.ip
    await s.gateway.wait_hosts(db.cluster, db.endpoints(), within=FOLLOW_BOUND_S + 10)

    async def probed() -> bool:
        return address.probes > 0

    await until(probed, "db-1 probed once it has an IP")

    # db-0 turns NotReady: it leaves Envoy (and comes back when Ready again).
    loop = asyncio.get_running_loop()
    await db.set_ready("db-0", ready=False)
    not_ready_at = loop.time()
    await s.gateway.wait_hosts(db.cluster, db.endpoints(pods=["db-1"]), within=FOLLOW_BOUND_S + 10)
    left = loop.time() - not_ready_at
    await db.set_ready("db-0", ready=True)
    ready_at = loop.time()
    await s.gateway.wait_hosts(db.cluster, db.endpoints(), within=FOLLOW_BOUND_S + 10)
    back = loop.time() - ready_at
    took("pod NotReady → Envoy dropped it", left)
    took("pod Ready again → Envoy holds it", back)
    assert max(left, back) <= FOLLOW_BOUND_S
