"""Policy status and Events written by aviator.operator.StatusWriter on the real API server.

The writer runs with the operator's own ServiceAccount token (``aviator_install``), so the
shipped RBAC is what allows (or would refuse) every write. Resolutions come from the objects
as the server holds them (operator_support.resolutions), so generations, uids and creation
times are the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from aviator.k8s.fields import ObjectRef
from aviator.operator.acks import ClusterAcks
from aviator.operator.kube import KubeApi
from aviator.operator.status_writer import StatusWriter, policy_path
from aviator.testbed.kubeapi import KubeTestEnv
from tests.kubeapi.fixtures import AviatorInstall

from .operator_support import (
    deployment,
    eventually,
    kube_api,
    policy,
    ready_pods,
    resolutions,
)

ACKED = ClusterAcks(proxies=2, current=2)


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}


def get_policy(env: KubeTestEnv, ns: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = env.get(
        "aviatorpolicies", name, namespace=ns, group="aviator.io", version="v1alpha1"
    )
    return obj


@contextlib.asynccontextmanager
async def running(writer: StatusWriter) -> AsyncIterator[StatusWriter]:
    task = asyncio.create_task(writer.run())
    try:
        yield writer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_status(
    env: KubeTestEnv, ns: str, name: str, check: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        obj = await asyncio.to_thread(get_policy, env, ns, name)
        return obj if check(obj) else None

    return await eventually(probe, what=what)


def has(obj: dict[str, Any], **want: str) -> bool:
    c = conditions(obj)
    return all(t in c and f"{c[t]['status']} {c[t]['reason']}" == v for t, v in want.items())


@pytest.fixture
async def api(aviator_install: AviatorInstall) -> AsyncIterator[KubeApi]:
    async with kube_api(aviator_install.kubeconfig) as api:
        yield api


async def setup_web(env: KubeTestEnv, ns: str, pods: int = 3) -> None:
    await asyncio.to_thread(env.apply, deployment("web", ns, replicas=pods))
    await asyncio.to_thread(ready_pods, env, ns, "web", pods)


async def test_a_valid_policy_is_accepted_resolved_and_programmed_with_its_generation(
    kube_env: KubeTestEnv, kube_namespace: str, api: KubeApi
) -> None:
    ns = kube_namespace
    await setup_web(kube_env, ns)
    await asyncio.to_thread(kube_env.apply, policy("web", ns, target="web"))
    writer = StatusWriter(api, instance="test-replica", settle=0.0)
    async with running(writer):
        writer.update(await resolutions(kube_env, ns), {f"{ns}/web": ACKED})
        obj = await wait_status(
            kube_env, ns, "web",
            lambda o: has(o, Accepted="True Accepted", ResolvedRefs="True ResolvedRefs",
                          Programmed="True Programmed"),
            "Accepted, ResolvedRefs and Programmed True",
        )  # fmt: skip
    generation = obj["metadata"]["generation"]
    assert obj["status"]["observedGeneration"] == generation
    assert all(c["observedGeneration"] == generation for c in conditions(obj).values())
    assert obj["status"]["endpoints"] == 3
    # What `kubectl get avp` promises: its printer columns read those fields.
    table = kube_env.kubectl("get", "avp", "web", "-n", ns, "--no-headers").stdout.split()
    assert table[:7] == ["web", "web", "100ms", "1s", "True", "True", "3"], table
    wide = kube_env.kubectl("get", "avp", "web", "-n", ns, "-o", "wide", "--no-headers").stdout
    assert wide.split()[-2:] == ["Deployment", "True"]  # Kind, Resolved

    # One Event per condition that appeared, about this object (describe matches on uid).
    events = kube_env.get("events", namespace=ns)["items"]
    mine = [e for e in events if e["involvedObject"].get("uid") == obj["metadata"]["uid"]]
    assert sorted(e["reason"] for e in mine) == ["Accepted", "Programmed", "ResolvedRefs"]
    assert {e["type"] for e in mine} == {"Normal"}
    assert all(e["reportingInstance"] == "test-replica" for e in mine)
    described = kube_env.kubectl("describe", "avp", "web", "-n", ns).stdout
    assert "Accepted=True: accepted" in described


async def test_missing_target_conflict_and_nack_each_get_their_reason(
    kube_env: KubeTestEnv, kube_namespace: str, api: KubeApi
) -> None:
    ns = kube_namespace
    await setup_web(kube_env, ns, pods=2)
    for yaml_text in (
        policy("a-older", ns, target="web"),
        policy("b-newer", ns, target="web"),
        policy("lost", ns, target="nowhere"),
    ):
        await asyncio.to_thread(kube_env.apply, yaml_text)
    nack = ClusterAcks(
        proxies=2,
        current=1,
        rejected=1,
        messages=(
            "Proto constraint validation failed (ClusterLoadAssignmentValidationError"
            ".Endpoints[0]: ...)",
        ),
    )
    writer = StatusWriter(api, settle=0.0)
    async with running(writer):
        writer.update(await resolutions(kube_env, ns), {f"{ns}/web": nack})
        lost = await wait_status(
            kube_env, ns, "lost", lambda o: has(o, Accepted="False TargetNotFound"),
            "TargetNotFound",
        )  # fmt: skip
        newer = await wait_status(
            kube_env, ns, "b-newer", lambda o: has(o, Accepted="False Conflicted"), "Conflicted"
        )
        older = await wait_status(
            kube_env, ns, "a-older", lambda o: has(o, Programmed="False Rejected"), "Rejected"
        )
    assert has(lost, ResolvedRefs="False TargetNotFound", Programmed="False NotServing")
    assert "Deployment" in conditions(lost)["Accepted"]["message"]
    assert "nowhere" in conditions(lost)["Accepted"]["message"]
    assert f"AviatorPolicy {ns}/a-older" in conditions(newer)["Accepted"]["message"]
    assert has(older, Accepted="True Accepted")
    message = conditions(older)["Programmed"]["message"]
    assert "1 of 2 proxies rejected" in message
    assert "ClusterLoadAssignmentValidationError" in message
    assert newer["status"]["endpoints"] == 0
    assert older["status"]["endpoints"] == 2
    # Failures are Warnings.
    events = kube_env.get("events", namespace=ns)["items"]
    warnings = {
        (e["involvedObject"]["name"], e["reason"]) for e in events if e["type"] == "Warning"
    }
    assert {
        ("lost", "TargetNotFound"),
        ("b-newer", "Conflicted"),
        ("a-older", "Rejected"),
    } <= warnings


async def test_a_condition_written_by_someone_else_survives_and_keeps_its_place(
    kube_env: KubeTestEnv, kube_namespace: str, api: KubeApi
) -> None:
    ns = kube_namespace
    await setup_web(kube_env, ns, pods=1)
    await asyncio.to_thread(kube_env.apply, policy("web", ns, target="web"))
    foreign = {
        "type": "example.com/Audited",
        "status": "True",
        "reason": "Reviewed",
        "message": "reviewed by the audit controller",
        "lastTransitionTime": "2024-01-02T03:04:05Z",
    }
    obj = get_policy(kube_env, ns, "web")
    obj["status"] = {"conditions": [foreign]}
    kube_env.request("PUT", policy_path(ObjectRef("AviatorPolicy", ns, "web"), "status"), obj)

    writer = StatusWriter(api, settle=0.0)
    async with running(writer):
        writer.update(await resolutions(kube_env, ns), {f"{ns}/web": ACKED})
        await wait_status(kube_env, ns, "web", lambda o: has(o, Programmed="True Programmed"),
                          "Programmed True")  # fmt: skip
        # A second transition (the proxies go away) rewrites Aviator's conditions again.
        writer.update(await resolutions(kube_env, ns), {})
        after = await wait_status(
            kube_env, ns, "web", lambda o: has(o, Programmed="Unknown NoProxies"), "NoProxies"
        )
    listed = after["status"]["conditions"]
    assert listed[0] == foreign  # untouched, and still first
    assert [c["type"] for c in listed] == [
        "example.com/Audited", "Accepted", "ResolvedRefs", "Programmed",
    ]  # fmt: skip


async def test_identical_updates_write_nothing_and_only_transitions_move_transition_times(
    kube_env: KubeTestEnv, kube_namespace: str, api: KubeApi
) -> None:
    ns = kube_namespace
    await setup_web(kube_env, ns, pods=3)
    await asyncio.to_thread(kube_env.apply, policy("web", ns, target="web"))
    writer = StatusWriter(api, settle=0.0, per_policy=0.0)
    async with running(writer):
        writer.update(await resolutions(kube_env, ns), {f"{ns}/web": ACKED})
        first = await wait_status(
            kube_env, ns, "web", lambda o: has(o, Programmed="True Programmed"), "Programmed True"
        )
        writes = api.writes
        # A minute of steady probing at 10 reweighs a second: the same desired status, rebuilt
        # from fresh reads each time (new objects, equal values). Also proxies that come and
        # go while all of them hold the endpoints: the message has no count to churn.
        for i in range(600):
            if i % 100 == 0:
                res = await resolutions(kube_env, ns)
            acks = ClusterAcks(proxies=2 + i % 3, current=2 + i % 3)
            writer.update(res, {f"{ns}/web": acks})
            await asyncio.sleep(0)
        await asyncio.sleep(1.0)  # would the writer write anything, it has had the time
        assert api.writes == writes
        assert writer.reconciler.pending == 0
        again = get_policy(kube_env, ns, "web")
        assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]

        # An edit: generation 2. observedGeneration follows on every condition; a condition
        # whose status stays True keeps its lastTransitionTime.
        kube_env.kubectl("patch", "avp", "web", "-n", ns, "--type=merge",
                         "-p", json.dumps({"spec": {"latencyThreshold": "250ms"}}))  # fmt: skip
        writer.update(await resolutions(kube_env, ns), {f"{ns}/web": ACKED})
        edited = await wait_status(
            kube_env, ns, "web", lambda o: o["status"].get("observedGeneration") == 2,
            "observedGeneration 2",
        )  # fmt: skip
    assert edited["metadata"]["generation"] == 2
    assert {c["observedGeneration"] for c in conditions(edited).values()} == {2}
    for t in ("Accepted", "ResolvedRefs", "Programmed"):
        assert (
            conditions(edited)[t]["lastTransitionTime"]
            == conditions(first)[t]["lastTransitionTime"]
        )
    assert api.writes == writes + 1  # one status write; no Event: nothing transitioned


async def test_a_409_from_a_concurrent_writer_is_retried_on_a_fresh_read(
    kube_env: KubeTestEnv, kube_namespace: str, aviator_install: AviatorInstall
) -> None:
    ns = kube_namespace
    await setup_web(kube_env, ns, pods=1)
    await asyncio.to_thread(kube_env.apply, policy("web", ns, target="web"))
    ref = ObjectRef("AviatorPolicy", ns, "web")

    class Interleaved(KubeApi):
        """Between Aviator's read and its write, another client writes the status: the
        API server then answers Aviator's replace with a real 409."""

        interleaved = 0

        async def replace(self, url_path: str, body: Any) -> Any:
            if url_path.endswith("/status") and self.interleaved < 2:
                self.interleaved += 1
                other = await asyncio.to_thread(get_policy, kube_env, ns, "web")
                other.setdefault("status", {})["conditions"] = [
                    *(other.get("status") or {}).get("conditions", []),
                    {"type": f"example.com/Other{self.interleaved}", "status": "True",
                     "reason": "Concurrent", "message": "another writer",
                     "lastTransitionTime": "2024-01-02T03:04:05Z"},
                ]  # fmt: skip
                await asyncio.to_thread(kube_env.request, "PUT", policy_path(ref, "status"), other)
            return await super().replace(url_path, body)

    async with kube_api(aviator_install.kubeconfig) as plain:
        api = Interleaved(plain.client)  # same ApiClient, the interleaving subclass
        writer = StatusWriter(api, settle=0.0)
        async with running(writer):
            writer.update(await resolutions(kube_env, ns), {f"{ns}/web": ACKED})
            obj = await wait_status(kube_env, ns, "web",
                                    lambda o: has(o, Programmed="True Programmed"),
                                    "Programmed True")  # fmt: skip
    assert writer.conflicts == 2
    assert api.requests["PUT"] == 3  # two 409s, then the write that stuck
    types = [c["type"] for c in obj["status"]["conditions"]]
    assert types == [
        "example.com/Other1", "example.com/Other2", "Accepted", "ResolvedRefs", "Programmed",
    ]  # fmt: skip


async def test_a_follower_writes_nothing_until_it_leads(
    kube_env: KubeTestEnv, kube_namespace: str, api: KubeApi
) -> None:
    ns = kube_namespace
    await setup_web(kube_env, ns, pods=1)
    await asyncio.to_thread(kube_env.apply, policy("web", ns, target="web"))

    class Gate:
        leading = False

        def is_leader(self) -> bool:
            return self.leading

    gate = Gate()
    writer = StatusWriter(api, gate=gate, settle=0.0)
    async with running(writer):
        writer.update(await resolutions(kube_env, ns), {f"{ns}/web": ACKED})
        await asyncio.sleep(1.0)
        assert api.writes == 0
        assert "status" not in get_policy(kube_env, ns, "web")
        gate.leading = True
        writer.leadership(True)
        await wait_status(kube_env, ns, "web", lambda o: has(o, Programmed="True Programmed"),
                          "Programmed True once leading")  # fmt: skip
    events = kube_env.get("events", namespace=ns)["items"]
    mine = [e for e in events if e["involvedObject"]["kind"] == "AviatorPolicy"]
    assert len(mine) == 3
