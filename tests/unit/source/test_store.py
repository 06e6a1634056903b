"""ClusterState (sorting, versions), decode_object dispatch and the Store's notifications."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from aviator.k8s.fields import ObjectError, ObjectRef
from aviator.k8s.objects import Pod, Workload, parse_pod, parse_workload
from aviator.k8s.policy import AviatorPolicy, InvalidPolicy
from aviator.k8s.state import ClusterState, Problem, decode_object
from aviator.source.store import Store
from tests.unit.k8s.builders import pod_doc, policy_doc, workload_doc


def test_decode_dispatches_by_kind() -> None:
    assert isinstance(decode_object(policy_doc()), AviatorPolicy)
    assert isinstance(decode_object(policy_doc(port=0)), InvalidPolicy)
    assert isinstance(decode_object(workload_doc()), Workload)
    assert isinstance(decode_object(workload_doc(kind="StatefulSet")), Workload)
    assert isinstance(decode_object(pod_doc("p", "10.0.0.1")), Pod)


def test_other_kinds_are_ignored() -> None:
    assert decode_object({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}) is None
    assert decode_object({"apiVersion": "apps/v1", "kind": "DaemonSet"}) is None


@pytest.mark.parametrize(
    ("doc", "ref", "message"),
    [
        (
            {"apiVersion": "apps/v1beta2", "kind": "Deployment", "metadata": {"name": "d"}},
            ObjectRef("Deployment", "default", "d"),
            "apps/v1beta2 Deployment is not a kind Aviator reads; allowed: apps/v1 Deployment, "
            "apps/v1 StatefulSet, aviator.io/v1alpha1 AviatorPolicy, v1 Pod",
        ),
        (
            {"apiVersion": "aviator.io/v1", "kind": "AviatorPolicy", "metadata": {"name": "p"}},
            ObjectRef("AviatorPolicy", "default", "p"),
            "aviator.io/v1 AviatorPolicy is not a kind Aviator reads; allowed: apps/v1 "
            "Deployment, apps/v1 StatefulSet, aviator.io/v1alpha1 AviatorPolicy, v1 Pod",
        ),
        (
            {"kind": "Pod", "metadata": {"name": "p", "namespace": "n"}},
            ObjectRef("Pod", "n", "p"),
            "every object needs a string apiVersion and kind",
        ),
        (
            {"apiVersion": "v1", "metadata": {"name": "p"}},
            ObjectRef("<no kind>", "default", "p"),
            "every object needs a string apiVersion and kind",
        ),
    ],
)
def test_misversioned_or_kindless_objects_are_errors(
    doc: dict[str, object], ref: ObjectRef, message: str
) -> None:
    with pytest.raises(ObjectError) as exc:
        decode_object(doc)
    assert exc.value.ref == ref
    assert [(e.path, e.message) for e in exc.value.errors] == [("apiVersion", message)]


def _pod(name: str, rv: str = "1") -> Pod:
    p = parse_pod(pod_doc(name, "10.0.0.1"))
    return dataclasses.replace(p, meta=dataclasses.replace(p.meta, resource_version=rv))


def test_build_sorts_groups_and_versions_by_content() -> None:
    w = parse_workload(workload_doc())
    s1 = ClusterState.build([_pod("b"), w, _pod("a")])
    assert [p.meta.name for p in s1.pods] == ["a", "b"]
    assert s1.workloads == (w,)
    assert s1.get(ObjectRef("Pod", "shop", "b")) == _pod("b")
    assert s1.get(ObjectRef("Pod", "shop", "zzz")) is None
    # Same content in another order: same version. A changed resourceVersion or a new
    # problem: another version.
    assert ClusterState.build([_pod("a"), _pod("b"), w]).version == s1.version
    assert ClusterState.build([_pod("a", "2"), _pod("b"), w]).version != s1.version
    assert (
        ClusterState.build([_pod("a"), _pod("b"), w], [Problem("f", "bad")]).version != s1.version
    )


def test_state_rejects_unsorted_or_duplicate_objects() -> None:
    with pytest.raises(ValueError, match="sorted by reference and unique"):
        ClusterState(pods=(_pod("b"), _pod("a")))
    with pytest.raises(ValueError, match="sorted by reference and unique"):
        ClusterState(pods=(_pod("a"), _pod("a")))


def test_problem_str() -> None:
    p = Problem(
        "m/p.yaml", "must be positive", 2, 1, 14, ObjectRef("AviatorPolicy", "a", "b"), "spec.x"
    )
    assert str(p) == "m/p.yaml:14, document 2 item 1, AviatorPolicy a/b: spec.x: must be positive"
    assert str(Problem("m/p.yaml", "YAML does not parse")) == "m/p.yaml: YAML does not parse"


async def test_store_wakes_consumers_and_skips_unchanged_states() -> None:
    store = Store()
    assert not store.synced
    seen: list[str] = []

    async def consume() -> None:
        async for state in store.updates():
            seen.append(state.version)
            if len(seen) == 2:
                return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    assert seen == []  # nothing before the first publish
    s1 = ClusterState.build([_pod("a")])
    assert store.publish(s1)
    assert store.synced
    await asyncio.sleep(0)
    assert not store.publish(ClusterState.build([_pod("a")]))  # same version: no wake-up
    s2 = ClusterState.build([_pod("a", "2")])
    assert store.publish(s2)
    await asyncio.wait_for(task, 1)
    assert seen == [s1.version, s2.version]
    assert store.current is s2


async def test_slow_consumer_sees_only_the_latest_state() -> None:
    store = Store()
    states = [ClusterState.build([_pod("a", str(i))]) for i in range(5)]
    for s in states:
        store.publish(s)
    updates = store.updates()
    assert (await anext(updates)) is states[-1]
    store.publish(states[0])
    assert (await anext(updates)) is states[0]
    await updates.aclose()


async def test_first_publish_of_an_empty_state_counts_as_synced() -> None:
    store = Store()
    empty = ClusterState.build(())
    assert store.current.version == empty.version
    assert store.publish(empty)  # even though the version equals the initial one
    assert store.synced
