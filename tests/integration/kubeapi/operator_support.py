"""Helpers for the operator's tests on the real API server (aviator/testbed/kubeapi.py).

- :func:`kube_api`: a :class:`~aviator.operator.kube.KubeApi` for a kubeconfig (Aviator's
  ServiceAccount's, to test the shipped RBAC, or the admin's), closed afterwards.
- :func:`resolutions`: what Aviator's resolver makes of a namespace *as the API server holds
  it* (policies, Deployments, StatefulSets and Pods read through the REST API), standing in
  for the Kubernetes source until it lands: the writers get real objects' generations, uids
  and creation times.
- :func:`eventually`: poll a condition until a deadline (the writers run as tasks).
- :func:`deployment`, :func:`policy`: YAML for ``kubectl apply``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from aviator.k8s.resolve import PolicyResolution, resolve_state
from aviator.k8s.state import ClusterState, decode_object
from aviator.operator.kube import KubeApi, api_client_from_kubeconfig
from aviator.probing.estimator import EndpointStats
from aviator.probing.weigher import WeighResult, weigh
from aviator.testbed.kubeapi import KubeTestEnv
from tests.kubeapi.fixtures import AviatorInstall

T = TypeVar("T")
REPLICA_NS = "aviator-system"  # the operator's namespace, where its Leases live


@asynccontextmanager
async def kube_api(kubeconfig: Path, **kwargs: Any) -> AsyncIterator[KubeApi]:
    client = await api_client_from_kubeconfig(str(kubeconfig))
    try:
        yield KubeApi(client, **kwargs)
    finally:
        await client.close()  # type: ignore[no-untyped-call]


def _items(
    env: KubeTestEnv, resource: str, ns: str, group: str, version: str, kind: str
) -> list[Any]:
    listed = env.get(resource, namespace=ns, group=group, version=version)["items"]
    api_version = f"{group}/{version}" if group else version
    for item in listed:  # list items carry no apiVersion/kind
        item.setdefault("apiVersion", api_version)
        item.setdefault("kind", kind)
    return list(listed)


def read_state(env: KubeTestEnv, ns: str) -> ClusterState:
    docs = [
        *_items(env, "aviatorpolicies", ns, "aviator.io", "v1alpha1", "AviatorPolicy"),
        *_items(env, "deployments", ns, "apps", "v1", "Deployment"),
        *_items(env, "statefulsets", ns, "apps", "v1", "StatefulSet"),
        *_items(env, "pods", ns, "", "v1", "Pod"),
    ]
    objects = [o for d in docs if (o := decode_object(d)) is not None]
    return ClusterState.build(objects)


async def resolutions(env: KubeTestEnv, ns: str) -> tuple[PolicyResolution, ...]:
    state = await asyncio.to_thread(read_state, env, ns)
    return resolve_state(state)


async def eventually(
    check: Callable[[], Awaitable[T | None]], *, within: float = 20.0, what: str = "condition"
) -> T:
    """Poll ``check`` (every 50 ms) until it returns something truthy; fail at ``within``."""
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        result = await check()
        if result:
            return result
        last = result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within}s (last: {last!r})")
        await asyncio.sleep(0.05)


def deployment(name: str, ns: str, *, replicas: int = 3, port: int = 8080) -> str:
    return f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      containers:
        - {{name: main, image: example/{name}:1, ports: [{{name: http, containerPort: {port}}}]}}
"""


def policy(name: str, ns: str, *, target: str, extra: str = "", threshold: str = "100ms") -> str:
    return f"""
apiVersion: aviator.io/v1alpha1
kind: AviatorPolicy
metadata: {{name: {name}, namespace: {ns}}}
spec:
  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: {target}}}
  latencyThreshold: {threshold}
  pingInterval: 1s
{extra}"""


def ready_pods(
    env: KubeTestEnv, ns: str, app: str, count: int, *, first_ip: int = 11, net: str = "127.0.0"
) -> list[Any]:
    """Wait for ``count`` pods of ``app`` and make them Running and Ready with IPs
    <net>.<first_ip>, ... (sorted by name); returns them as updated. (Endpoints refuse
    loopback addresses: tests of Services use another ``net``.)"""
    pods = env.wait_for_pods(ns, f"app={app}", count)
    return [
        env.set_pod_status(ns, p["metadata"]["name"], ip=f"{net}.{first_ip + i}", ready=True)
        for i, p in enumerate(pods)
    ]


def weights_for(
    resolution: PolicyResolution, latency_ms: dict[str, float], previous: WeighResult | None = None
) -> WeighResult:
    """The weigher's answer for ``resolution`` when each pod (by name) answers in
    ``latency_ms`` (pods not named: 5 ms), as the control plane would compute it for pods that
    run the agent (their load reports make the signal confident: without them the weigher
    does no harm and marks nothing hot for a slow probe alone)."""
    policy = resolution.policy
    assert policy is not None
    stats = {
        e.address: EndpointStats(
            latency_s=latency_ms.get(e.pod, 5.0) / 1000,
            probe_latency_s=latency_ms.get(e.pod, 5.0) / 1000,
            reported_latency_s=latency_ms.get(e.pod, 5.0) / 1000,
            rif=1.0,
            error_rate=0.0,
            samples=50,
            age_s=0.1,
            consecutive_failures=0,
        )
        for e in resolution.endpoints
    }
    return weigh(
        stats,
        knobs=policy.weigher,
        latency_threshold_s=policy.latency_threshold.seconds,
        previous=previous,
    )


def kubectl_patch(env: KubeTestEnv, kind: str, name: str, ns: str, patch: dict[str, Any]) -> None:
    env.kubectl("patch", kind, name, "-n", ns, "--type=merge", "-p", json.dumps(patch))


@pytest.fixture
def replica_pods(aviator_install: AviatorInstall) -> Iterator[tuple[str, str, str]]:
    """Two stand-in operator Pods, Ready, and the label selector that finds them."""
    env = aviator_install.env
    tag = secrets.token_hex(3)
    selector = f"test-replica={tag}"
    names = (f"aviator-{tag}-a", f"aviator-{tag}-b")
    for i, name in enumerate(names):
        env.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {REPLICA_NS}, labels: {{test-replica: "{tag}"}}}}
spec: {{containers: [{{name: aviator, image: example/aviator:1}}]}}
""")  # fmt: skip
        env.set_pod_status(REPLICA_NS, name, ip=f"10.2.0.{i + 1}", ready=True)
    yield names[0], names[1], selector
    env.kubectl("delete", "pods", "-n", REPLICA_NS, "-l", selector, "--wait=false")
