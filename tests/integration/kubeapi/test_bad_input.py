"""Bad input through the Kubernetes source and the status (issue 14), on the real 1.20 server.

A corpus of AviatorPolicies that the CRD's schema lets through (1.20 has no CEL, so the
duration bounds and ``probe.timeout <= pingInterval`` are Aviator's to enforce), policies
whose references do not resolve, and objects of odd shapes (IPv6 and IPv4-mapped pod IPs,
253-character names, pods without an IP, two pods on one IP, a ``matchExpressions``
selector), all applied with kubectl. The source (in-process, the operator ServiceAccount's
credentials) reads them; the resolver and :mod:`aviator.operator.status` decide each
policy's conditions; a :class:`StatusWriter` writes them to the server, and the test reads
them back as a user's ``kubectl get avp -o yaml`` would: each bad policy says Accepted=False
(reason Invalid, the field, what is allowed) or why its reference does not resolve, while
the good policy next to them keeps serving, also through an invalid edit of its own.

Inputs the API server refuses itself (schema, apps/v1 validation) never reach Aviator; a
few are sent with ``--dry-run=server`` to show that the split is where the CRD says.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from aviator.k8s.lastvalid import LastValid
from aviator.k8s.policy import InvalidPolicy
from aviator.k8s.resolve import PolicyResolution, resolve_state
from aviator.k8s.state import ClusterState
from aviator.operator.status_writer import StatusWriter
from aviator.source.kubernetes import KubernetesSource
from aviator.testbed.kubeapi import KubeTestEnv, KubeTestEnvError
from tests.kubeapi.fixtures import AviatorInstall

from .operator_support import kube_api
from .test_source import FAST, RecordingStore

pytestmark = pytest.mark.timeout(300)

LONG = "l" * 240 + "-policy-name"  # 252 characters: a CR's name may have 253
LONG_TARGET = "t" * 253


def policy(name: str, target: str = "web", kind: str = "Deployment", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "targetRef": {"apiVersion": "apps/v1", "kind": kind, "name": target},
        "latencyThreshold": "100ms",
        "pingInterval": "5s",
    }
    body.update(spec)
    return {
        "apiVersion": "aviator.io/v1alpha1",
        "kind": "AviatorPolicy",
        "metadata": {"name": name},
        "spec": body,
    }


@dataclass(frozen=True)
class Case:
    """One policy of the corpus and the condition it must get on the server."""

    doc: dict[str, Any]
    condition: str  # the condition type that reports it
    reason: str
    says: tuple[str, ...]  # fragments of the condition's message: the field, what is allowed
    status: str = "False"

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])


# Each lets the CRD's schema through (1.20: no CEL) and is Aviator's to report.
INVALID = [
    Case(policy("ping-too-fast", pingInterval="5ms"), "Accepted", "Invalid",
         ("spec.pingInterval", "5ms is out of range; allowed: 10ms to 5m0s")),
    Case(policy("ping-too-slow", pingInterval="1h1h1h1h"), "Accepted", "Invalid",
         ("spec.pingInterval", "4h0m0s is out of range; allowed: 10ms to 5m0s")),
    Case(policy("threshold-too-long", latencyThreshold="2m"), "Accepted", "Invalid",
         ("spec.latencyThreshold", "2m0s is out of range; allowed: 1ms to 1m0s")),
    Case(policy("threshold-sub-ms", latencyThreshold=".5ms"), "Accepted", "Invalid",
         ("spec.latencyThreshold", "500µs is out of range; allowed: 1ms to 1m0s")),
    Case(policy("timeout-over-interval", pingInterval="1s", probe={"timeout": "3s"}),
         "Accepted", "Invalid",
         ("spec.probe.timeout", "3s is longer than spec.pingInterval (1s)")),
    Case(policy("duration-overflow", pingInterval="99999999999999999999h"), "Accepted", "Invalid",
         ("spec.pingInterval", "is too long: at most about 2562047h")),
    Case(policy("zero-by-rounding", latencyThreshold="0.0000001ns"), "Accepted", "Invalid",
         ("spec.latencyThreshold", "is zero; durations must be positive")),
    Case(policy("path-with-fragment", probe={"path": "/healthz#deep"}), "Accepted", "Invalid",
         ("spec.probe.path", "must not hold '#'", "%23")),
    Case(policy("three-errors", pingInterval="5ms", latencyThreshold="2m",
                probe={"timeout": "0.0000001ns"}),
         "Accepted", "Invalid",
         ("3 validation errors", "spec.pingInterval", "spec.latencyThreshold",
          "spec.probe.timeout", "nothing is served")),
]  # fmt: skip

# Valid specs whose references do not resolve.
UNRESOLVED = [
    Case(policy("no-such-target", target="missing"), "Accepted", "TargetNotFound",
         ("Deployment", "missing not found")),
    Case(policy("wrong-kind", target="web", kind="StatefulSet"), "ResolvedRefs",
         "TargetNotFound", ("a Deployment with that name exists",
                            "set spec.targetRef.kind: Deployment")),
    Case(policy("unknown-port", target="ports", port="grpc"), "ResolvedRefs", "PortNotFound",
         ("spec.port", "no TCP container port named 'grpc'", "named ports: http")),
    Case(policy("long-target", target=LONG_TARGET), "Accepted", "TargetNotFound",
         (f"{LONG_TARGET} not found",)),
    Case(policy("second-on-good", target="good"), "Accepted", "Conflicted",
         ("is already balanced by AviatorPolicy", "/good", "only one policy may target")),
]  # fmt: skip

# Refused by the API server (schema or apps/v1 validation): never seen by Aviator.
REFUSED = [
    (policy("no-unit", pingInterval="5"), "spec.pingInterval"),
    (policy("daemonset", kind="DaemonSet"), "spec.targetRef.kind"),
    (policy("port-zero", port=0), "spec.port"),
    (policy("relative-path", probe={"path": "healthz"}), "spec.probe.path"),
    (policy("uppercase-target", target="Web"), "spec.targetRef.name"),
    (policy("ratio-zero", weigher={"maxWeightRatio": 0}), "spec.weigher.maxWeightRatio"),
    (
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "no-selector"},
         "spec": {"template": {"metadata": {"labels": {"app": "x"}},
                               "spec": {"containers": [{"name": "m", "image": "x"}]}}}},
        "spec.selector",
    ),
]  # fmt: skip


def deployment(
    name: str,
    *,
    replicas: int,
    labels: dict[str, str] | None = None,
    selector: dict[str, Any] | None = None,
    port: str = "http",
) -> dict[str, Any]:
    labels = labels or {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": selector or {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {"name": "main", "image": "example/web",
                         "ports": [{"name": port, "containerPort": 8080}]}
                    ]
                },
            },
        },
    }  # fmt: skip


def bare_pod(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "main", "image": "example/web"}]},
    }


def as_yaml(*docs: dict[str, Any]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


async def apply(env: KubeTestEnv, ns: str, *docs: dict[str, Any]) -> None:
    await asyncio.to_thread(env.apply, as_yaml(*docs), namespace=ns)


async def status_of(env: KubeTestEnv, ns: str, ip: str | None, pod: str, ready: bool = True) -> Any:
    return await asyncio.to_thread(
        functools.partial(env.set_pod_status, ns, pod, ip=ip, ready=ready)
    )


async def refused_status(env: KubeTestEnv, ns: str, ip: str, pod: str) -> int | None:
    """Set a pod's IP; None if the server took it, else the HTTP status that refused it."""
    try:
        await status_of(env, ns, ip, pod)
    except KubeTestEnvError as exc:
        return exc.status
    return None


@contextlib.asynccontextmanager
async def source_in(kubeconfig: Path, ns: str) -> AsyncIterator[RecordingStore]:
    source = KubernetesSource(kubeconfig=kubeconfig, namespaces=(ns,), options=FAST)
    store = RecordingStore()
    task = asyncio.create_task(source.run(store), name="kubernetes source")
    try:
        yield store
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(store: RecordingStore, check: Any, what: str, within: float = 30.0) -> ClusterState:
    deadline = time.monotonic() + within
    while True:
        if store.synced and check(store.current):
            return store.current
        if time.monotonic() > deadline:
            state = store.current if store.synced else None
            raise AssertionError(f"not within {within} s: {what}; state: {state}")
        await asyncio.sleep(0.05)


def _by_name(resolutions: tuple[PolicyResolution, ...]) -> dict[str, PolicyResolution]:
    return {r.ref.name: r for r in resolutions}


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}


async def test_the_schema_refuses_what_it_can_and_no_such_object_reaches_aviator(
    aviator_crd: str, kube_env: KubeTestEnv, kube_namespace: str
) -> None:
    for doc, field in REFUSED:
        # The server's own verdict (not kubectl's client-side validation).
        argv = ("apply", "--dry-run=server", "--validate=false", "-f", "-", "-n", kube_namespace)
        proc = await asyncio.to_thread(
            functools.partial(kube_env.kubectl, *argv, input=as_yaml(doc), check=False)
        )
        name = doc["metadata"]["name"]
        assert proc.returncode != 0, f"{name} was accepted"
        assert f"{field}: " in proc.stderr, (name, proc.stdout, proc.stderr)


async def test_bad_policies_and_odd_objects_are_reported_and_the_rest_keeps_serving(
    aviator_install: AviatorInstall, kube_namespace: str
) -> None:
    env, ns = aviator_install.env, kube_namespace
    corpus = INVALID + UNRESOLVED
    await apply(
        env, ns,
        deployment("good", replicas=2),
        deployment("web", replicas=0),
        deployment("ports", replicas=0),
        deployment("odd", replicas=0),
        deployment("expr", replicas=2, labels={"app": "expr", "tier": "main"},
                   selector={"matchLabels": {"app": "expr"}, "matchExpressions": [
                       {"key": "tier", "operator": "NotIn", "values": ["canary"]}]}),
        bare_pod("odd-v6", {"app": "odd"}),
        bare_pod("odd-mapped", {"app": "odd"}),
        bare_pod("odd-no-ip", {"app": "odd"}),
        bare_pod("odd-twin-a", {"app": "odd"}),
        bare_pod("odd-twin-b", {"app": "odd"}),
        bare_pod("odd-" + "n" * 249, {"app": "odd"}),  # 253 characters, a pod's maximum
        bare_pod("expr-canary", {"app": "expr", "tier": "canary"}),
        policy("good", target="good"),
        policy("odd", target="odd", port=8080),
        policy("expr", target="expr"),
        deployment("big", replicas=0),
        bare_pod("big-0", {"app": "big"}),
        policy(LONG, target="big"),
    )  # fmt: skip
    await asyncio.sleep(0.2)  # "second-on-good" must be the younger of the two on "good"
    await apply(env, ns, *(c.doc for c in corpus))

    good = await asyncio.to_thread(env.wait_for_pods, ns, "app=good", 2)
    for i, p in enumerate(good):
        await status_of(env, ns, f"10.72.0.{i + 1}", p["metadata"]["name"])
    expr = await asyncio.to_thread(env.wait_for_pods, ns, "app=expr,tier=main", 2)
    for i, p in enumerate(expr):
        await status_of(env, ns, f"10.72.1.{i + 1}", p["metadata"]["name"])
    await status_of(env, ns, "10.72.1.9", "expr-canary")  # ready, but not selected
    await status_of(env, ns, "fd00:72::5", "odd-v6")
    await status_of(env, ns, None, "odd-no-ip")  # Running and Ready, no IP reported yet
    await status_of(env, ns, "10.72.2.7", "odd-twin-a")  # hostNetwork-like: one IP, two pods
    await status_of(env, ns, "10.72.2.7", "odd-twin-b")
    await status_of(env, ns, "10.72.2.8", "odd-" + "n" * 249)
    await status_of(env, ns, "10.72.3.1", "big-0")
    # An IPv4-mapped IPv6 address, and one with leading zeros: what 1.20 lets through, Aviator
    # must take or report; what it refuses never arrives.
    mapped = await refused_status(env, ns, "::ffff:10.72.2.9", "odd-mapped")
    assert mapped in (None, 422)
    zeros = await refused_status(env, ns, "010.072.002.010", "odd-no-ip")
    assert zeros in (None, 422)
    zeros_accepted = zeros is None

    names = {c.name for c in corpus} | {"good", "odd", "expr", LONG}
    async with source_in(aviator_install.kubeconfig, ns) as store:
        state = await until(
            store,
            lambda s: (
                {p.ref.name for p in s.policies} == names
                and len(_by_name(resolve_state(s))["good"].endpoints) == 2
                and len(_by_name(resolve_state(s))["expr"].endpoints) == 2
                and len(_by_name(resolve_state(s))["odd"].endpoints) >= 3
                and len(_by_name(resolve_state(s))[LONG].endpoints) == 1
            ),
            "every policy, and the good ones serving",
        )
        res = _by_name(resolve_state(state))

        # The good policies serve, whatever sits next to them.
        assert [str(e.address) for e in res["good"].endpoints] == [
            "10.72.0.1:8080", "10.72.0.2:8080"
        ]  # fmt: skip
        assert [str(e.address) for e in res["expr"].endpoints] == [
            "10.72.1.1:8080", "10.72.1.2:8080"
        ]  # fmt: skip
        assert res["expr"].pods == 2  # the canary is not selected (NotIn)
        odd = sorted(str(e.address) for e in res["odd"].endpoints)
        expected_odd = ["10.72.2.7:8080", "10.72.2.8:8080", "[fd00:72::5]:8080"]
        if mapped is None:
            expected_odd.append("[::ffff:10.72.2.9]:8080")
        assert odd == sorted(expected_odd)
        assert "odd-no-ip" in res["odd"].not_ready or zeros_accepted
        # A policy name of 252 characters serves as any other (its cluster is the workload's).
        assert [str(e.address) for e in res[LONG].endpoints] == ["10.72.3.1:8080"]
        # Invalid policies are in the state as InvalidPolicy, each with a problem naming the
        # object's API path and the field.
        invalid = {p.ref.name for p in state.policies if isinstance(p, InvalidPolicy)}
        assert invalid == {c.name for c in INVALID}
        for c in INVALID:
            problems = [
                p for p in state.problems if p.source.endswith(f"/aviatorpolicies/{c.name}")
            ]
            assert problems, c.name
            assert all(p.field and p.field.startswith("spec.") for p in problems), problems
        if zeros_accepted:
            assert any("010.072.002.010" in p.message for p in state.problems), state.problems

        # The status, written by the operator's writer and read back from the server.
        async with kube_api(aviator_install.kubeconfig, field_manager="aviator-test") as api:
            writer = StatusWriter(api, instance="bad-input", settle=0.0, per_policy=0.0,
                                  rate=1000.0, burst=1000)  # fmt: skip
            task = asyncio.create_task(writer.run())
            try:
                writer.update(res.values(), {})
                statuses = await _statuses(env, ns, names)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for c in corpus:
            cond = _conditions(statuses[c.name]).get(c.condition)
            assert cond is not None, (c.name, statuses[c.name].get("status"))
            assert (cond["status"], cond["reason"]) == (c.status, c.reason), (c.name, cond)
            for fragment in c.says:
                assert fragment in cond["message"], (c.name, fragment, cond["message"])
            if c in INVALID:
                assert statuses[c.name]["status"]["endpoints"] == 0
        good_conditions = _conditions(statuses["good"])
        assert good_conditions["Accepted"]["status"] == "True"
        assert statuses["good"]["status"]["endpoints"] == 2
        assert _conditions(statuses[LONG])["Accepted"]["status"] == "True"
        assert statuses[LONG]["status"]["endpoints"] == 1

        # An invalid edit of the good policy: reported, and its last valid spec keeps serving.
        memory = LastValid().update(state.policies)
        await apply(env, ns, policy("good", target="good", pingInterval="5ms"))
        edited = await until(
            store,
            lambda s: any(isinstance(p, InvalidPolicy) and p.ref.name == "good"
                          for p in s.policies),
            "the invalid edit",
        )  # fmt: skip
        memory = memory.update(edited.policies)
        after = _by_name(resolve_state(edited, last_valid=memory))
        assert after["good"].serving
        assert after["good"].last_valid
        assert len(after["good"].endpoints) == 2
        accepted = after["good"].condition("Accepted")
        assert accepted is not None
        assert accepted.reason == "Invalid"
        assert "spec.pingInterval" in accepted.message
        assert "keeps being served" in accepted.message
        for name in ("expr", "odd"):
            assert after[name].endpoints == res[name].endpoints
        print(f"{len(corpus)} bad policies reported; leading-zero pod IP accepted by the "
              f"1.20 server: {zeros_accepted}; IPv4-mapped pod IP accepted: "
              f"{mapped is None}; events written: {writer.events_written}")  # fmt: skip


async def _statuses(
    env: KubeTestEnv, ns: str, names: set[str], within: float = 30.0
) -> dict[str, dict[str, Any]]:
    """Every policy of ``names`` as the server holds it, once each has all three conditions."""
    deadline = time.monotonic() + within
    while True:
        listed = await asyncio.to_thread(
            env.get, "aviatorpolicies", namespace=ns, group="aviator.io", version="v1alpha1"
        )
        found = {o["metadata"]["name"]: o for o in listed["items"]}
        done = {n for n, o in found.items() if len(_conditions(o)) == 3}
        if names <= done:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no status written for {sorted(names - done)}")
        await asyncio.sleep(0.1)
