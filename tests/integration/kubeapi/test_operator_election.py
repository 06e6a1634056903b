"""Leader election on the real API server: one leader, failover, release, loss at the deadline.

Every elector authenticates as the operator's ServiceAccount (``aviator_install``), so the
shipped Role (leases: get, create, update in aviator-system) is what lets it work. Timings
are short (lease 2 s, renew deadline 1.5 s, retry 0.25 s); the rules are the defaults' rules.
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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from aviator.operator.election import ElectionTiming
from aviator.operator.elector import LeaderElector
from aviator.operator.kube import KubeApi
from aviator.operator.status_writer import StatusWriter
from aviator.testbed.kubeapi import ROOT, KubeTestEnv
from tests.kubeapi.fixtures import AviatorInstall

from .operator_support import deployment, eventually, kube_api, policy, ready_pods, resolutions

FAST = ElectionTiming(lease_duration=2.0, renew_deadline=1.5, retry_period=0.25)
NS = "aviator-system"


def lease_of(env: KubeTestEnv, name: str) -> dict[str, Any]:
    lease: dict[str, Any] = env.get("leases", name, namespace=NS, group="coordination.k8s.io")
    return lease


@contextlib.asynccontextmanager
async def candidate(
    kubeconfig: Path, lease: str, identity: str, timing: ElectionTiming = FAST
) -> AsyncIterator[tuple[LeaderElector, KubeApi]]:
    async with kube_api(kubeconfig, timeout=5.0) as api:
        elector = LeaderElector(api, namespace=NS, name=lease, identity=identity, timing=timing)
        task = asyncio.create_task(elector.run())
        try:
            yield elector, api
        finally:
            elector.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)


class Sampler:
    """Samples who believes it leads every 10 ms; fails if two ever do at once."""

    def __init__(self, *electors: LeaderElector) -> None:
        self.electors = list(electors)
        self.overlaps = 0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            leading = [e.identity for e in self.electors if e.is_leader()]
            self.samples += 1
            if len(leading) > 1:
                self.overlaps += 1
            await asyncio.sleep(0.01)

    def __enter__(self) -> Sampler:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def test_two_candidates_one_leader_and_release_hands_over_at_once(
    aviator_install: AviatorInstall, kube_env: KubeTestEnv
) -> None:
    kc = aviator_install.kubeconfig
    async with (
        candidate(kc, "election-a", "replica-a") as (a, _),
        candidate(kc, "election-a", "replica-b") as (b, _),
    ):
        with Sampler(a, b) as sampler:
            await eventually(lambda: _any_leader(a, b), what="a leader")
            leader, follower = (a, b) if a.is_leader() else (b, a)
            await asyncio.sleep(3 * FAST.lease_duration)  # several renewals, no change
            assert leader.is_leader()
            assert not follower.is_leader()
            assert follower.leader == leader.identity
            spec = lease_of(kube_env, "election-a")["spec"]
            assert spec["holderIdentity"] == leader.identity
            assert spec["leaseDurationSeconds"] == 2
            assert leader.transitions == 1
            assert follower.transitions == 0

            # A graceful stop releases the lease: the other leads within a retry or two,
            # far sooner than a lease duration.
            stopped = time.monotonic()
            leader.stop()
            await eventually(lambda: _leads(follower), within=FAST.lease_duration,
                             what="the follower leading after the release")  # fmt: skip
            assert time.monotonic() - stopped < FAST.lease_duration
        assert sampler.overlaps == 0
        assert sampler.samples > 100
    spec = lease_of(kube_env, "election-a")["spec"]
    assert spec["leaseTransitions"] == 1


async def _any_leader(*electors: LeaderElector) -> bool:
    return any(e.is_leader() for e in electors)


async def _leads(e: LeaderElector) -> bool:
    return e.is_leader()


_CHILD = """
import asyncio, sys
from aviator.operator.election import ElectionTiming
from aviator.operator.elector import LeaderElector
from tests.integration.kubeapi.operator_support import kube_api

async def main(kubeconfig, lease, identity):
    async with kube_api(kubeconfig, timeout=5.0) as api:
        e = LeaderElector(api, namespace="aviator-system", name=lease, identity=identity,
                          timing=ElectionTiming(2.0, 1.5, 0.25))
        e.subscribe(lambda leading: print("LEADING" if leading else "LOST", flush=True))
        await e.run()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_killed_leader_is_replaced_within_the_lease_duration(
    aviator_install: AviatorInstall, kube_env: KubeTestEnv
) -> None:
    kc = aviator_install.kubeconfig
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(  # noqa: ASYNC220 - a child to SIGKILL, started once
        [sys.executable, "-c", _CHILD, str(kc), "election-kill", "replica-killed"],
        stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        stdout = child.stdout

        def leading() -> None:  # the child also logs to stdout
            while (line := stdout.readline()) and line.strip() != "LEADING":
                pass
            assert line, "the child ended before it led"

        await asyncio.wait_for(asyncio.to_thread(leading), 30)
        async with candidate(kc, "election-kill", "replica-survivor") as (survivor, _):
            await asyncio.sleep(2 * FAST.lease_duration)
            assert not survivor.is_leader()  # the child renews: no takeover
            child.send_signal(signal.SIGKILL)  # no release: the lease must expire
            child.wait(10)
            killed = time.monotonic()
            await eventually(lambda: _leads(survivor), within=10, what="the survivor leading")
            took = time.monotonic() - killed
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    # The survivor waits a lease duration from the last renewal it saw (≤ one retry period
    # before the kill, seen ≤ 1.2 retry periods later).
    assert FAST.lease_duration - 2 * FAST.retry_period < took
    assert took < FAST.lease_duration + 2 * FAST.retry_period + 0.5


async def test_a_leader_cut_off_from_the_api_server_stops_leading_at_its_renew_deadline(
    aviator_install: AviatorInstall, kube_env: KubeTestEnv
) -> None:
    kc = aviator_install.kubeconfig
    async with candidate(kc, "election-cut", "replica-cut") as (elector, _):
        await eventually(lambda: _leads(elector), what="leading")
        lost: list[float] = []
        elector.subscribe(lambda leading: lost.append(time.monotonic()) if not leading else None)
        await asyncio.to_thread(kube_env.stop_apiserver, kill=True)
        cut = time.monotonic()
        try:
            await eventually(lambda: _not_leads(elector), within=5, what="leadership lost")
            # Lost at the renew deadline (counted from the start of the last successful
            # renewal, ≤ a retry period before the cut), not when some request timed out.
            assert lost
            assert lost[0] - cut <= FAST.renew_deadline + 0.1
            assert lost[0] - cut >= FAST.renew_deadline - FAST.retry_period - 0.1
        finally:
            await asyncio.to_thread(kube_env.start_apiserver)
        # The API server is back: the same candidate stands again and wins (nobody else).
        await eventually(lambda: _leads(elector), within=30, what="leading again")
        assert elector.transitions == 3


async def _not_leads(e: LeaderElector) -> bool:
    return not e.is_leader()


async def test_only_the_leaders_status_writer_writes(
    aviator_install: AviatorInstall, kube_env: KubeTestEnv, kube_namespace: str
) -> None:
    ns = kube_namespace
    await asyncio.to_thread(kube_env.apply, deployment("web", ns, replicas=2))
    await asyncio.to_thread(ready_pods, kube_env, ns, "web", 2)
    await asyncio.to_thread(kube_env.apply, policy("web", ns, target="web"))
    kc = aviator_install.kubeconfig
    res = await resolutions(kube_env, ns)
    replicas = []
    async with contextlib.AsyncExitStack() as stack:
        for name in ("replica-x", "replica-y"):
            elector, _ = await stack.enter_async_context(candidate(kc, "election-w", name))
            api = await stack.enter_async_context(kube_api(kc, field_manager=f"aviator-{name}"))
            writer = StatusWriter(api, gate=elector, instance=name, settle=0.0)
            elector.subscribe(writer.leadership)
            task = asyncio.create_task(writer.run())
            stack.callback(task.cancel)
            writer.update(res, {})
            replicas.append((elector, api, writer))
        await eventually(lambda: _any_leader(*(e for e, _, _ in replicas)), what="a leader")

        async def written() -> dict[str, Any] | None:
            obj = await asyncio.to_thread(
                kube_env.get, "aviatorpolicies", "web", namespace=ns, group="aviator.io",
                version="v1alpha1",
            )  # fmt: skip
            return obj if "status" in obj else None

        obj = await eventually(written, what="the status written")
        await asyncio.sleep(1.0)
        (leader,) = [r for r in replicas if r[0].is_leader()]
        (follower,) = [r for r in replicas if r is not leader]
    assert follower[1].writes == 0
    assert leader[1].writes >= 1
    # Who wrote the status, as the API server recorded it.
    managers = {
        m["manager"] for m in obj["metadata"]["managedFields"] if m.get("subresource") == "status"
        or "f:status" in json.dumps(m.get("fieldsV1", {}))
    }  # fmt: skip
    assert managers == {f"aviator-{leader[0].identity}"}


pytestmark = pytest.mark.timeout(180)
